"""The gRPC contract: services, RPC names, AIP request shapes, streaming kinds and stubs.

These tests read the descriptors compiled into the generated stubs, so they fail when
a proto drops an RPC or renames a standard field, and when the committed stubs no
longer match the protos.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

from ferrule.v1 import (
    analysis_service_pb2,
    common_pb2,
    health_service_pb2,
    prediction_service_pb2,
    user_service_pb2,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "ferrule.v1"
FILES: list[FileDescriptor] = [
    m.DESCRIPTOR
    for m in (
        analysis_service_pb2,
        common_pb2,
        health_service_pb2,
        prediction_service_pb2,
        user_service_pb2,
    )
]

REQUIRED_RPCS: dict[str, set[str]] = {
    "UserService": {
        "CreateOrganization",
        "GetOrganization",
        "ListOrganizations",
        "UpdateOrganization",
        "DeleteOrganization",
        "UndeleteOrganization",
        "CreateUser",
        "GetUser",
        "ListUsers",
        "UpdateUser",
        "DeleteUser",
        "UndeleteUser",
        "LookupUserByEmail",
        "SearchUsers",
        "VerifyPassword",
        "GetUserStatistics",
        "CreateUserSession",
        "GetUserSession",
        "ListUserSessions",
        "RevokeUserSession",
    },
    "AnalysisService": {
        "CreateAnalysis",
        "GetAnalysis",
        "ListAnalyses",
        "SearchAnalyses",
        "UpdateAnalysis",
        "DeleteAnalysis",
        "UndeleteAnalysis",
        "BatchCreateAnalyses",
        "CreateBatch",
        "GetBatch",
        "ListBatches",
        "UpdateBatch",
        "DeleteBatch",
        "UndeleteBatch",
        "CreateModelPerformance",
        "ListModelPerformances",
        "GetAnalysisStatistics",
    },
    "PredictionService": {
        "CreatePrediction",
        "BatchCreatePredictions",
        "StreamPredictions",
        "GetPrediction",
        "ListPredictions",
        "ExportPredictions",
        "GetRiskDistribution",
        "GetPredictionStatistics",
        "PurgePredictions",
        "ListRequestLogs",
    },
    "HealthService": {"GetHealthReport", "GetSlowQueryReport", "ResetSlowQueryReport"},
}

# (service, resource message, collection in RPC names) for the standard methods.
# `soft_delete` resources also have Delete/Undelete/Update and `show_deleted` on List.
STANDARD: list[tuple[str, str, str, bool]] = [
    ("UserService", "Organization", "Organization", True),
    ("UserService", "User", "User", True),
    ("AnalysisService", "Analysis", "Analysis", True),
    ("AnalysisService", "AnalysisBatch", "Batch", True),
    ("UserService", "UserSession", "UserSession", False),
    ("AnalysisService", "ModelPerformance", "ModelPerformance", False),
    ("PredictionService", "Prediction", "Prediction", False),
]
# Top-level resources (AIP-133/132): no `parent` on Create and List.
TOP_LEVEL = {"Organization"}
PLURALS = {
    "Organization": "Organizations",
    "User": "Users",
    "Analysis": "Analyses",
    "Batch": "Batches",
    "UserSession": "UserSessions",
    "ModelPerformance": "ModelPerformances",
    "Prediction": "Predictions",
}
AUDITED_FIELDS = ("name", "etag", "create_time", "update_time", "create_by", "update_by")
SOFT_DELETE_FIELDS = ("delete_time", "delete_by")


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def pool() -> descriptor_pool.DescriptorPool:
    # The generated modules register their files in the default pool on import.
    return descriptor_pool.Default()


def service(name: str) -> ServiceDescriptor:
    return pool().FindServiceByName(f"{PACKAGE}.{name}")


def method(service_name: str, rpc: str) -> MethodDescriptor:
    found = service(service_name).methods_by_name.get(rpc)
    assert found is not None, f"{service_name}.{rpc} is missing"
    return found


def message(name: str) -> Descriptor:
    return pool().FindMessageTypeByName(f"{PACKAGE}.{name}")


def field(msg: Descriptor, name: str) -> FieldDescriptor:
    found = msg.fields_by_name.get(name)
    assert found is not None, f"{msg.full_name} has no field {name!r}"
    return found


def assert_scalar(msg: Descriptor, name: str, cpp_type: int) -> None:
    f = field(msg, name)
    assert f.cpp_type == cpp_type, f"{msg.full_name}.{name} has the wrong type"
    assert not f.is_repeated, f"{msg.full_name}.{name} must not be repeated"


def assert_message(msg: Descriptor, name: str, type_name: str) -> None:
    f = field(msg, name)
    assert f.message_type is not None, f"{msg.full_name}.{name} is not a message"
    assert f.message_type.full_name == type_name, f"{msg.full_name}.{name} type"


def assert_repeated(msg: Descriptor, name: str, type_name: str) -> Descriptor:
    """Asserts `name` is a repeated field of message type `type_name`; returns that type."""
    f = field(msg, name)
    assert f.is_repeated, f"{msg.full_name}.{name} must be repeated"
    assert f.message_type is not None, f"{msg.full_name}.{name} is not a message"
    assert f.message_type.full_name == type_name, f"{msg.full_name}.{name} type"
    return f.message_type


def assert_string(msg: Descriptor, name: str) -> None:
    assert_scalar(msg, name, FieldDescriptor.CPPTYPE_STRING)


def assert_int32(msg: Descriptor, name: str) -> None:
    assert_scalar(msg, name, FieldDescriptor.CPPTYPE_INT32)


def assert_bool(msg: Descriptor, name: str) -> None:
    assert_scalar(msg, name, FieldDescriptor.CPPTYPE_BOOL)


def test_files_declare_package_and_language_options() -> None:
    for fd in FILES:
        assert fd.package == PACKAGE, fd.name
        assert fd.name.startswith("ferrule/v1/"), fd.name
        opts = fd.GetOptions()
        assert opts.go_package == "github.com/ferrule/ferrule/gen/go/ferrule/v1;ferrulev1"
        assert opts.java_package == "dev.ferrule.v1"
        assert opts.java_multiple_files


@pytest.mark.parametrize("service_name", sorted(REQUIRED_RPCS))
def test_service_has_required_rpcs(service_name: str) -> None:
    have = set(service(service_name).methods_by_name)
    missing = REQUIRED_RPCS[service_name] - have
    assert not missing, f"{service_name} lacks {sorted(missing)}"


def test_streaming_kinds() -> None:
    for svc_name, rpcs in REQUIRED_RPCS.items():
        for rpc in rpcs:
            m = method(svc_name, rpc)
            kind = (m.client_streaming, m.server_streaming)
            if rpc == "StreamPredictions":
                assert kind == (True, True), "StreamPredictions must be bidirectional"
            elif rpc == "ExportPredictions":
                assert kind == (False, True), "ExportPredictions must be server-streaming"
            else:
                assert kind == (False, False), f"{svc_name}.{rpc} must be unary"


@pytest.mark.parametrize(("svc", "resource", "coll", "soft"), STANDARD)
def test_standard_methods_have_aip_shapes(svc: str, resource: str, coll: str, soft: bool) -> None:
    res_full = f"{PACKAGE}.{resource}"
    x = snake(coll)

    create = method(svc, f"Create{coll}")
    assert create.output_type.full_name == res_full, "Create returns the resource"
    req = create.input_type
    assert req.name == f"Create{coll}Request"
    if resource not in TOP_LEVEL:
        assert_string(req, "parent")
    assert_message(req, x, res_full)
    assert_string(req, f"{x}_id")
    assert_string(req, "request_id")

    list_rpc = method(svc, f"List{PLURALS[coll]}")
    lreq, lresp = list_rpc.input_type, list_rpc.output_type
    if resource not in TOP_LEVEL:
        assert_string(lreq, "parent")
    assert_int32(lreq, "page_size")
    assert_string(lreq, "page_token")
    assert_string(lreq, "order_by")
    if soft:
        assert_bool(lreq, "show_deleted")
    assert_repeated(lresp, snake(PLURALS[coll]), res_full)
    assert_string(lresp, "next_page_token")
    assert_int32(lresp, "total_size")

    get_rpc = service(svc).methods_by_name.get(f"Get{coll}")
    if get_rpc is not None:
        assert get_rpc.output_type.full_name == res_full
        assert [f.name for f in get_rpc.input_type.fields] == ["name"]

    if not soft:
        return
    update = method(svc, f"Update{coll}")
    assert update.output_type.full_name == res_full
    assert [f.name for f in update.input_type.fields] == [x, "update_mask"]
    assert_message(update.input_type, x, res_full)
    assert_message(update.input_type, "update_mask", "google.protobuf.FieldMask")

    delete = method(svc, f"Delete{coll}")
    assert delete.output_type.full_name == res_full, "soft Delete returns the resource"
    assert [f.name for f in delete.input_type.fields] == ["name", "etag"]

    undelete = method(svc, f"Undelete{coll}")
    assert undelete.output_type.full_name == res_full
    assert [f.name for f in undelete.input_type.fields] == ["name"]

    res = message(resource)
    for name in (*AUDITED_FIELDS, *SOFT_DELETE_FIELDS):
        field(res, name)
    for name in ("create_time", "update_time", "delete_time"):
        assert_message(res, name, "google.protobuf.Timestamp")


def test_predictions_are_immutable() -> None:
    rpcs = set(service("PredictionService").methods_by_name)
    assert not {"UpdatePrediction", "DeletePrediction"} & rpcs


def test_batch_create_methods_follow_aip_233() -> None:
    for svc, rpc, child, out in [
        ("AnalysisService", "BatchCreateAnalyses", "CreateAnalysisRequest", "analyses"),
        ("PredictionService", "BatchCreatePredictions", "CreatePredictionRequest", "predictions"),
    ]:
        m = method(svc, rpc)
        assert_string(m.input_type, "parent")
        assert_string(m.input_type, "request_id")
        assert_repeated(m.input_type, "requests", f"{PACKAGE}.{child}")
        assert field(m.output_type, out).is_repeated


def test_stream_predictions_messages() -> None:
    m = method("PredictionService", "StreamPredictions")
    req, resp = m.input_type, m.output_type
    assert_string(req, "parent")
    assert_string(req, "batch_id")
    assert_repeated(req, "predictions", f"{PACKAGE}.Prediction")
    assert_string(resp, "batch_id")
    assert_int32(resp, "accepted")
    assert_int32(resp, "duplicates")
    rejected = assert_repeated(resp, "rejected", f"{PACKAGE}.RejectedPrediction")
    assert_int32(rejected, "index")
    violation = assert_repeated(rejected, "violations", f"{PACKAGE}.FieldViolation")
    assert_string(violation, "field")
    assert_string(violation, "description")


def test_prediction_filter_is_shared() -> None:
    filt = f"{PACKAGE}.PredictionFilter"
    for rpc in (
        "ListPredictions",
        "ExportPredictions",
        "GetRiskDistribution",
        "GetPredictionStatistics",
    ):
        assert_message(method("PredictionService", rpc).input_type, "filter", filt)
    pf = message("PredictionFilter")
    for name in ("subject_id", "model_name", "model_version"):
        assert_string(pf, name)
    risk = field(pf, "risk_level").enum_type
    assert risk is not None
    assert risk.full_name == f"{PACKAGE}.RiskLevel"
    assert field(pf, "min_probability").has_presence, "min_probability 0 must differ from unset"
    export = method("PredictionService", "ExportPredictions").output_type
    assert_repeated(export, "predictions", f"{PACKAGE}.Prediction")


def test_create_user_carries_input_only_password_and_user_has_none() -> None:
    assert_string(message("CreateUserRequest"), "password")
    assert "password" not in message("User").fields_by_name
    assert_message(message("User"), "profile", f"{PACKAGE}.UserProfile")


def test_enums_have_unspecified_zero_and_prefixed_values() -> None:
    enums: list[EnumDescriptor] = [e for fd in FILES for e in fd.enum_types_by_name.values()]
    assert {e.name for e in enums} >= {
        "UserRole",
        "UserStatus",
        "AuthProvider",
        "AnalysisType",
        "AnalysisState",
        "OptimizationTier",
        "RiskLevel",
        "HealthStatus",
    }
    for e in enums:
        prefix = snake(e.name).upper() + "_"
        assert e.values_by_number[0].name == prefix + "UNSPECIFIED", e.name
        for v in e.values:
            assert v.name.startswith(prefix), v.name


def test_expected_enum_values() -> None:
    expected = {
        "UserRole": {"VIEWER", "MEMBER", "ADMIN", "OWNER"},
        "UserStatus": {"ACTIVE", "INACTIVE", "SUSPENDED", "PENDING_VERIFICATION"},
        "AuthProvider": {"EMAIL", "GOOGLE", "GITHUB", "SAML"},
        "AnalysisState": {"PENDING", "PROCESSING", "COMPLETED", "FAILED"},
        "RiskLevel": {"LOW", "MEDIUM", "HIGH"},
        "AnalysisType": {
            "SENTIMENT",
            "QUALITY",
            "EMOTION",
            "ENTITIES",
            "KEYWORDS",
            "SUMMARY",
            "LANGUAGE",
            "TOXICITY",
        },
    }
    for enum_name, values in expected.items():
        e = pool().FindEnumTypeByName(f"{PACKAGE}.{enum_name}")
        prefix = snake(enum_name).upper() + "_"
        have = {v.name.removeprefix(prefix) for v in e.values} - {"UNSPECIFIED"}
        assert have == values, enum_name


def test_every_rpc_and_field_is_documented() -> None:
    # Comments are the documentation Go and Java developers work from; the
    # descriptors in the generated stubs carry no source info, so read the protos.
    for proto in sorted((ROOT / "protos" / "ferrule" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_decl = re.match(r"^(rpc|message|enum|service)\s", stripped) or re.match(
                r"^(repeated |optional |map<[^>]+> )?[\w.]+ \w+ = \d+;$", stripped
            )
            if is_decl and not stripped.startswith("option"):
                prev = lines[i - 1].strip() if i else ""
                assert prev.startswith("//"), f"{proto.name}:{i + 1} undocumented: {stripped}"


def test_committed_stubs_match_protos() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check", "client"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def buf() -> str:
    beside = Path(sys.executable).parent / "buf"
    found = str(beside) if beside.is_file() else shutil.which("buf")
    assert found is not None, "buf (buf-bin) is not installed"
    return found


def test_buf_lint_is_clean() -> None:
    result = subprocess.run([buf(), "lint"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
