"""``python -m server.telemetry.export_child``: the span export process (see span_process)."""

from server.telemetry.span_process import main

if __name__ == "__main__":
    raise SystemExit(main())
