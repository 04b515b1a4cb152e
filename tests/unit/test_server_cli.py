"""The ``libtorchrt-pool`` command line: every option documented (``--help`` and
docs/server.md), checked before anything loads; tritonserver's spellings accepted where
they mean the same, refused where they do not; the JSON log; and docs/deployment.md's
manifests and container recipe parse and use options the command takes."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # a dev dependency (pyproject.toml): docs/deployment.md's manifests are YAML

from libtorchrt.server.cli import JsonFormatter, build_parser, log_level, options_from
from libtorchrt.server.security import Address, UsageError

DOCS = Path(__file__).resolve().parents[2] / "docs"
TOKEN = "0123456789abcdef-token"


def option_strings() -> list[str]:
    return [s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")]


def test_help_and_server_md_document_every_option() -> None:
    text = build_parser().format_help()
    server_md = (DOCS / "server.md").read_text()
    for option in option_strings():
        assert option in text, option
        assert f"`{option}" in server_md, f"docs/server.md does not document {option}"


def parse(*argv: str, repo: Path) -> Any:
    return options_from(build_parser().parse_args(["--model-repository", str(repo), *argv]))


def test_defaults_bind_loopback_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIBTORCHRT_HTTP_TOKEN", raising=False)
    opts = parse(repo=tmp_path)
    assert opts.http == Address("127.0.0.1", 8000) and opts.metrics == Address("127.0.0.1", 8002)
    assert opts.grpc == Address("127.0.0.1", 8001) and opts.grpc_tls is None
    assert opts.zmq is None and opts.token is None and not opts.insecure
    assert opts.limits.max_request_bytes == 64 << 20
    assert parse("--max-request-bytes", "512k", repo=tmp_path).limits.max_request_bytes == 512 << 10
    assert parse("--max-request-bytes", "2MiB", repo=tmp_path).limits.max_request_bytes == 2 << 20
    assert opts.limits.body_timeout == 30.0 and opts.limits.max_json_response_bytes == 4 << 20
    limits = parse("--body-timeout", "2.5", "--max-json-response-bytes", "64k", repo=tmp_path).limits
    assert limits.body_timeout == 2.5 and limits.max_json_response_bytes == 64 << 10
    assert opts.wake_limit == 2 and parse("--wake-limit", "0", repo=tmp_path).wake_limit == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--http", "0.0.0.0:8000"), "reachable from other machines"),
        (("--zmq", "tcp://0.0.0.0:8003"), "CURVE keys"),
        (("--http", "off", "--grpc", "off"), "no way to reach the models"),
        (("--zmq-curve-secret-key-file", "/dev/null"), "Z85"),
        (("--grace", "-1"), "--grace"),
    ],
)
def test_refused_command_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: tuple[str, ...],
                               message: str) -> None:  # fmt: skip
    monkeypatch.delenv("LIBTORCHRT_HTTP_TOKEN", raising=False)
    with pytest.raises(UsageError, match=message):
        parse(*argv, repo=tmp_path)


@pytest.mark.parametrize(("option", "good", "bad", "limit"), [("--busy-poll-us", "100", "1000001", 1000000),
                                                              ("--wake-limit", "16", "17", 16)])  # fmt: skip
def test_counted_options_are_whole_numbers_in_range(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str,
                                                    good: str, bad: str, limit: int) -> None:  # fmt: skip
    assert getattr(parse(option, good, repo=tmp_path), option[2:].replace("-", "_")) == int(good)
    for wrong in ("-5", "1.5", bad):
        with pytest.raises(SystemExit):
            parse(option, wrong, repo=tmp_path)
        assert f"argument {option}: '{wrong}' is not a number from 0 to {limit}" in capsys.readouterr().err


# ── tritonserver's spellings ───────────────────────────────────────────────────


def test_tritonserver_ports_bind_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIBTORCHRT_HTTP_TOKEN", raising=False)
    opts = parse("--http-port", "8080", "--metrics-port", "9090", "--grpc-port", "9001", repo=tmp_path)
    assert opts.http == Address("127.0.0.1", 8080) and opts.metrics == Address("127.0.0.1", 9090)
    assert opts.grpc == Address("127.0.0.1", 9001)
    assert parse("--http-port=0", repo=tmp_path).http == Address("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--http", "127.0.0.1:8000", "--http-port", "8000"), "--http and --http-port both"),
        (("--metrics", "off", "--metrics-port", "8002"), "--metrics and --metrics-port both"),
        (("--grpc", "127.0.0.1:8001", "--grpc-port", "8001"), "--grpc and --grpc-port both"),
        (("--load-model", "m"), "--load-model chooses them with --model-control-mode explicit"),
        (("--model-control-mode", "poll", "--load-model", "m"), "--model-control-mode poll loads every model"),
        (("--model-control-mode", "explicit", "--load-model", "*", "--load-model", "m"), "give it alone"),
        (("--strict", "--exit-on-error=false"), "contradict"),
    ],
)
def test_tritonserver_options_without_a_meaning_here_are_refused(
    tmp_path: Path, argv: tuple[str, ...], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        parse(*argv, repo=tmp_path)


def test_model_control_options(tmp_path: Path) -> None:
    opts = parse(repo=tmp_path)
    assert (opts.model_control, opts.load_models, opts.poll_secs) == ("none", (), 15.0)  # tritonserver's defaults
    opts = parse("--model-control-mode", "EXPLICIT", "--load-model", "a", "--load-model", "b", repo=tmp_path)
    assert (opts.model_control, opts.load_models) == ("explicit", ("a", "b"))
    assert parse("--model-control-mode=explicit", "--load-model=*", repo=tmp_path).load_models == ("*",)
    opts = parse("--model-control-mode", "poll", "--repository-poll-secs", "2.5", repo=tmp_path)
    assert (opts.model_control, opts.poll_secs) == ("poll", 2.5)
    # (tritonserver's manifests give it with explicit mode too: accepted, and it means nothing then)
    assert parse("--model-control-mode", "explicit", "--repository-poll-secs", "0", repo=tmp_path).poll_secs == 0
    for bad in ("-1", "nan", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--model-repository", ".", "--repository-poll-secs", bad])


def test_tritonserver_options_with_a_meaning_here(tmp_path: Path) -> None:
    assert parse("--model-control-mode", "none", repo=tmp_path).strict is False
    assert parse("--exit-on-error=true", repo=tmp_path).strict is True
    assert parse("--exit-on-error", "FALSE", repo=tmp_path).strict is False
    assert parse("--exit-on-error=1", "--strict", repo=tmp_path).strict is True
    assert parse(repo=tmp_path).strict is False  # unlike tritonserver, which exits on error by default
    assert parse("--log-verbose", "1", repo=tmp_path).access_log  # debug: the access log
    assert not parse("--log-verbose", "0", repo=tmp_path).access_log


@pytest.mark.parametrize(
    ("argv", "level"),
    [((), "info"), (("--log-verbose", "2"), "debug"), (("--log-verbose", "0"), "info"),
     (("--log-level", "warning", "--log-verbose", "0"), "warning"),
     (("--log-level", "debug", "--log-verbose", "1"), "debug")],
)  # fmt: skip
def test_log_verbose_is_log_level_debug(argv: tuple[str, ...], level: str) -> None:
    assert log_level(build_parser().parse_args(["--model-repository", ".", *argv])) == level


def test_log_verbose_and_another_log_level_are_refused() -> None:
    with pytest.raises(UsageError, match="--log-verbose 1 asks for --log-level debug, not error"):
        log_level(build_parser().parse_args(["--model-repository", ".", "--log-level", "error", "--log-verbose", "1"]))


def test_bad_tritonserver_values_are_argparse_errors() -> None:
    for argv in (["--http-port", "http"], ["--http-port", "70000"], ["--model-control-mode", "sometimes"],
                 ["--exit-on-error", "maybe"], ["--log-verbose", "-1"], ["--log-format", "xml"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["--model-repository", ".", *argv])
        assert e.value.code == 2, argv


# ── the JSON log ───────────────────────────────────────────────────────────────


def test_json_log_records_are_one_json_object_per_line() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("libtorchrt.server", logging.INFO, __file__, 1, 'loaded "%s"\nin %d s', ("m", 2), None)
    line = formatter.format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert set(doc) == {"time", "level", "logger", "message"}
    assert doc["level"] == "INFO" and doc["logger"] == "libtorchrt.server" and doc["message"] == 'loaded "m"\nin 2 s'
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", doc["time"])
    try:
        raise ValueError("bad")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = formatter.format(failed)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "ERROR" and doc["message"] == "failed"
    assert doc["exception"].startswith("Traceback (most recent call last):") and "ValueError: bad" in doc["exception"]


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a directory"):
        parse(repo=tmp_path / "missing")


def test_authentication_or_insecure_opens_other_addresses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIBTORCHRT_HTTP_TOKEN", raising=False)
    assert parse("--http", "0.0.0.0:8000", "--insecure", repo=tmp_path).insecure
    assert parse("--metrics", "0.0.0.0:8002", repo=tmp_path).metrics == Address("0.0.0.0", 8002)  # read-only
    monkeypatch.setenv("LIBTORCHRT_HTTP_TOKEN", TOKEN)
    assert parse("--http", "0.0.0.0:8000", repo=tmp_path).token == TOKEN.encode()


def test_bad_values_are_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--max-request-bytes", "lots"], ["--max-inflight", "0"], ["--log-level", "loud"],
                 ["--body-timeout", "0"], ["--body-timeout", "nan"], ["--max-json-response-bytes", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["--model-repository", ".", *argv])
        assert e.value.code == 2
    assert "is not a size" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "front_cpus"),
    [("1", 1), ("2", 2), ("0,2", (0, 2)), ("0-3", (0, 1, 2, 3)), ("3,", (3,)), ("4-5,1", (1, 4, 5))],
)
def test_front_cpus_is_a_count_or_a_cpu_list(tmp_path: Path, value: str, front_cpus: object) -> None:
    assert parse(repo=tmp_path).front_cpus is None
    assert parse("--front-cpus", value, repo=tmp_path).front_cpus == front_cpus


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("x", "is not a number of CPUs"),
        ("3-1", "runs backwards"),
        (",", "names no CPU"),
        ("-2", "is not a number of CPUs"),
    ],
)
def test_a_bad_front_cpus_is_an_argparse_error(capsys: pytest.CaptureFixture[str], value: str, says: str) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--model-repository", ".", f"--front-cpus={value}"])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_module_and_console_script() -> None:
    root = Path(__file__).resolve().parents[2]
    assert "from libtorchrt.server.cli import main" in (root / "libtorchrt" / "pool" / "__main__.py").read_text()
    assert re.search(r'(?m)^libtorchrt-pool = "libtorchrt\.server\.cli:main"$', (root / "pyproject.toml").read_text())


def test_the_installed_console_script() -> None:
    try:
        importlib.metadata.distribution("libtorchrt")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("libtorchrt runs from its source tree here, not installed (pip install -e .)")
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("libtorchrt-pool") == "libtorchrt.server.cli:main", "reinstall: pip install -e ."


# ── docs/deployment.md ─────────────────────────────────────────────────────────


def blocks(kind: str) -> list[str]:
    text = (DOCS / "deployment.md").read_text()
    return re.findall(rf"```{kind}\n(.*?)```", text, re.DOTALL)


def manifests() -> list[dict[str, Any]]:
    return [doc for block in blocks("yaml") for doc in yaml.safe_load_all(block) if doc]


def _check_args(args: list[str], tmp_path: Path) -> argparse.Namespace:
    args = [a.replace("/mnt/models", str(tmp_path)).replace("=/models", f"={tmp_path}") for a in args]
    parsed = build_parser().parse_args(args)
    options_from(parsed)  # the token comes from the Secret, as LIBTORCHRT_HTTP_TOKEN
    return parsed


def test_deployment_manifests_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBTORCHRT_HTTP_TOKEN", TOKEN)
    docs = manifests()
    kinds = {d["kind"]: d for d in docs}
    assert {"ServingRuntime", "InferenceService", "Secret", "Deployment", "Service"} <= set(kinds)
    runtime = kinds["ServingRuntime"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["spec"]["protocolVersions"] == ["v2"]
    container = runtime["spec"]["containers"][0]
    parsed = _check_args(container["args"], tmp_path)
    port = int(parsed.http.rsplit(":", 1)[1])
    assert container["ports"][0]["containerPort"] == port
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": port}
    assert container["env"][0]["name"] == "LIBTORCHRT_HTTP_TOKEN"
    service = kinds["InferenceService"]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    _check_args(pod["containers"][0]["args"], tmp_path)
    grace = float(parsed.grace)
    assert service["spec"]["predictor"]["terminationGracePeriodSeconds"] > grace
    assert pod["terminationGracePeriodSeconds"] > grace


def test_container_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBTORCHRT_HTTP_TOKEN", TOKEN)
    (dockerfile,) = blocks("dockerfile")
    lines = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("FROM python:3.")
    entry = next(line for line in lines if line.startswith("ENTRYPOINT"))
    cmd = next(line for line in lines if line.startswith("CMD"))
    assert yaml.safe_load(entry.removeprefix("ENTRYPOINT")) == ["libtorchrt-pool"]
    _check_args(yaml.safe_load(cmd.removeprefix("CMD")), tmp_path)
    assert any(line.startswith("USER") and "root" not in line for line in lines)
