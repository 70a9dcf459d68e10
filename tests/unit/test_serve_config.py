"""`logbroker serve`'s configuration loader: one table of settings read from defaults, TOML files,
LOGBROKER_* variables and flags, in that order of precedence; unknown keys fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from logbroker import cli
from logbroker.config import (
    DEFAULT_METRICS_PORT,
    SERVE_SETTINGS,
    ConfigError,
    broker_config_from_settings,
    broker_id_from_pod_name,
    metrics_address,
    read_serve_config_file,
    read_serve_env,
    resolve_serve_settings,
)


def resolve(argv: list[str], environ: dict[str, str] | None = None, hostname: str = "host"):
    args = cli.build_parser().parse_args(["serve", *argv])
    values = resolve_serve_settings(args.config, environ or {}, cli.serve_flags(args))
    return values, broker_config_from_settings(values, hostname)


def test_defaults_match_the_broker_config_defaults(tmp_path: Path):
    values, config = resolve([])
    assert values == {s.name: s.default for s in SERVE_SETTINGS}
    assert (config.listen_host, config.listen_port, config.broker_id, config.zookeeper) == ("127.0.0.1", 9092, 0, "")
    assert config.zk_session_timeout_ms == 6000 and config.controlled_shutdown_timeout_ms == 30_000


def test_metrics_are_on_by_default_at_the_documented_port_of_the_listen_host():
    assert metrics_address(resolve([])[0]) == ("127.0.0.1", DEFAULT_METRICS_PORT) == ("127.0.0.1", 9464)
    assert metrics_address(resolve(["--listen", "0.0.0.0:7000"])[0]) == ("0.0.0.0", 9464)
    assert metrics_address(resolve(["--metrics-listen", "off"])[0]) is None
    assert metrics_address(resolve(["--metrics-listen", "OFF"])[0]) is None
    assert metrics_address(resolve(["--metrics-listen", "10.0.0.1:9999"])[0]) == ("10.0.0.1", 9999)
    assert metrics_address(resolve([], {"LOGBROKER_METRICS_LISTEN": "off"})[0]) is None
    # off: the broker does not even count what /metrics would show (server/request_metrics.py)
    assert resolve([])[1].metrics_enabled and not resolve(["--metrics-listen", "off"])[1].metrics_enabled


def test_auto_leader_rebalance_is_off_by_default():
    assert not resolve([])[1].auto_leader_rebalance
    assert resolve(["--auto-leader-rebalance"])[1].auto_leader_rebalance
    assert resolve([], {"LOGBROKER_AUTO_LEADER_REBALANCE": "true"})[1].auto_leader_rebalance


def test_precedence_file_then_later_file_then_env_then_flag(tmp_path: Path):
    a = tmp_path / "a.toml"
    a.write_text('zookeeper = "zk-a:2181"\nzk_session_timeout_ms = 1000\nrack = "from-a"\nbroker_id = 7\n')
    b = tmp_path / "b.toml"
    b.write_text('rack = "from-b"\nzk_session_timeout_ms = 2000\n')
    secret = tmp_path / "secret"
    secret.write_text("s" * 32 + "\n")
    env = {"LOGBROKER_ZK_SESSION_TIMEOUT_MS": "3000", "LOGBROKER_BROKER_ID": "8",
           "LOGBROKER_CLUSTER_SECRET_FILE": str(secret)}
    values, config = resolve(["--config", str(a), "--config", str(b), "--broker-id", "9"], env)
    assert config.zookeeper == "zk-a:2181"  # only in a
    assert config.rack == "from-b"  # b after a
    assert config.zk_session_timeout_ms == 3000  # env over files
    assert config.broker_id == 9  # flag over env
    assert config.cluster_secret == b"s" * 32 and b"s" * 32 not in repr(config).encode()  # never printed


def test_every_setting_has_a_flag_an_env_var_and_a_file_key(tmp_path: Path):
    for s in SERVE_SETTINGS:
        text = s.choices[0] if s.choices else "1"
        argv = [s.flag] if s.kind is bool else [s.flag, "k=v" if s.kind is dict else text]
        flags = cli.serve_flags(cli.build_parser().parse_args(["serve", *argv]))
        assert flags[s.name] is not None and [n for n, v in flags.items() if v is not None] == [s.name]
        assert read_serve_env({s.env: "k=v" if s.kind is dict else text}) == {s.name: flags[s.name]}
        f = tmp_path / f"{s.name}.toml"
        toml = "true" if s.kind is bool else '{ k = "v" }' if s.kind is dict else text if s.kind is int else f'"{text}"'
        f.write_text(f"{s.name} = {toml}\n")
        assert read_serve_config_file(f) == {s.name: flags[s.name]}


def test_value_types_and_pairs(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text('broker_id_from_hostname = true\ndefault_topic_config = { retention_ms = 1000, cleanup_policy = "delete" }\n')
    values, config = resolve(["--config", str(f)], {"LOGBROKER_DEFAULT_TOPIC_CONFIG": "segment_bytes=1048576"},
                             hostname="logbroker-5")
    assert config.broker_id == 5
    assert config.default_topic_config == {"segment_bytes": "1048576"}  # the env value replaces the file's
    values, config = resolve(["--config", str(f), "--default-topic-config", "a=1", "--default-topic-config", "b=2"],
                             hostname="logbroker-5")
    assert config.default_topic_config == {"a": "1", "b": "2"}
    values, _ = resolve([], {"LOGBROKER_BROKER_ID_FROM_HOSTNAME": "no"})
    assert values["broker_id_from_hostname"] is False


@pytest.mark.parametrize("text, message", [
    ("zk_sesion_timeout_ms = 1\n", "unknown setting 'zk_sesion_timeout_ms'"),
    ('broker_id = "3"\n', "broker_id must be a int"),
    ("broker_id = true\n", "broker_id must be a int"),
    ("broker_id_from_hostname = 1\n", "must be a bool"),
    ('log_level = "loud"\n', "log_level must be one of"),
    ("listen = \n", "not valid TOML"),
    ('default_topic_config = "a=1"\n', "must be a table"),
])
def test_bad_config_file_fails_loudly(tmp_path: Path, text: str, message: str):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        read_serve_config_file(f)
    assert str(f) in str(info.value)


def test_missing_config_file_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_serve_config_file(tmp_path / "nope.toml")


@pytest.mark.parametrize("environ, message", [
    ({"LOGBROKER_ZK_SESION_TIMEOUT_MS": "1"}, "unknown environment variable LOGBROKER_ZK_SESION_TIMEOUT_MS"),
    ({"LOGBROKER_BROKER_ID": "two"}, "LOGBROKER_BROKER_ID: expected an integer"),
    ({"LOGBROKER_BROKER_ID_FROM_HOSTNAME": "maybe"}, "expected true or false"),
    ({"LOGBROKER_DEFAULT_TOPIC_CONFIG": "retention_ms"}, "expected KEY=VALUE"),
    ({"LOGBROKER_LOG_LEVEL": "loud"}, "log_level must be one of"),
])
def test_bad_environment_fails_loudly(environ: dict[str, str], message: str):
    with pytest.raises(ConfigError, match=message):
        read_serve_env(environ)


def test_other_commands_variables_and_foreign_variables_are_ignored():
    env = {"LOGBROKER_BOOTSTRAP": "x:1", "LOGBROKER_ZOOKEEPER_JARS": "/a.jar", "HOME": "/root", "LOGBROKERX": "1"}
    assert read_serve_env(env) == {}


def test_the_cleaner_crash_test_hook_is_not_a_serve_setting():
    from logbroker.storage.segment_cleaner import CRASH_ENV

    assert read_serve_env({CRASH_ENV: "before_swap"}) == {}


@pytest.mark.parametrize("name, expected", [
    ("logbroker-0", 0), ("logbroker-2", 2), ("my-logbroker-17", 17),
    ("logbroker-3.logbroker-headless.ns.svc.cluster.local", 3),
])
def test_broker_id_from_pod_name(name: str, expected: int):
    assert broker_id_from_pod_name(name) == expected


@pytest.mark.parametrize("name", ["logbroker", "logbroker-", "logbroker-x", ""])
def test_broker_id_from_a_name_without_ordinal_fails(name: str):
    with pytest.raises(ConfigError, match="does not end in -<number>"):
        broker_id_from_pod_name(name)


def test_log_cleaner_io_rate_and_threads_defaults_and_flags():
    _, config = resolve([])
    assert (config.log_cleaner_io_bytes_per_sec, config.log_cleaner_threads) == (64 << 20, 1)
    _, config = resolve(["--log-cleaner-io-bytes-per-sec", "0", "--log-cleaner-threads", "4"])
    assert (config.log_cleaner_io_bytes_per_sec, config.log_cleaner_threads) == (0, 4)


def test_heat_sampling_rate_default_and_flag():
    assert resolve([])[1].heat_sample_bytes_per_sec == 1 << 20
    assert resolve(["--heat-sample-bytes-per-sec", "0"])[1].heat_sample_bytes_per_sec == 0


def test_overload_bounds_defaults_and_flags():
    _, config = resolve([])
    assert (config.max_inflight_request_bytes, config.max_inflight_requests, config.overload_retry_after_ms) == (
        128 << 20, 4096, 100)
    _, config = resolve(["--max-inflight-request-bytes", "1048576", "--max-inflight-requests", "0",
                         "--overload-retry-after-ms", "20"])
    assert (config.max_inflight_request_bytes, config.max_inflight_requests, config.overload_retry_after_ms) == (
        1 << 20, 0, 20)


def test_broker_id_from_hostname_flag_wins_over_broker_id():
    _, config = resolve(["--broker-id", "4", "--broker-id-from-hostname"], hostname="logbroker-2")
    assert config.broker_id == 2


@pytest.mark.parametrize("argv, message", [
    (["--listen", "h:99999"], "bad port"),
    (["--metrics-listen", "h:x"], "bad port"),
    (["--zk-session-timeout-ms", "0"], "must be positive"),
    (["--broker-id", "-1"], "broker id must be >= 0"),
    (["--log-cleaner-io-bytes-per-sec", "-1"], "log_cleaner_io_bytes_per_sec must be >= 0"),
    (["--log-cleaner-threads", "0"], r"log_cleaner_threads must be in \[1, 16\]"),
    (["--log-cleaner-threads", "17"], r"log_cleaner_threads must be in \[1, 16\]"),
    (["--max-inflight-request-bytes", "-1"], "max_inflight_request_bytes must be >= 0"),
    (["--overload-retry-after-ms", "-5"], "overload_retry_after_ms must be >= 0"),
    (["--heat-sample-bytes-per-sec", "-1"], "heat_sample_bytes_per_sec must be >= 0"),
])
def test_bad_values_fail(argv: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        resolve(argv)


def test_serve_reports_a_config_error_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    f = tmp_path / "bad.toml"
    f.write_text("nope = 1\n")
    assert cli.main(["serve", "--config", str(f)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("logbroker: error: ") and "unknown setting 'nope'" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, environ, expected", [
    ([], {}, (True, "", 0)),  # default: the listen host, a port the OS picks
    (["--data-listen", ""], {}, (True, "", 0)),
    (["--data-listen", "off"], {}, (False, "", 0)),
    (["--data-listen", " OFF "], {}, (False, "", 0)),
    (["--data-listen", "10.1.2.3:9093"], {}, (True, "10.1.2.3", 9093)),
    (["--data-listen", "[::1]:9094"], {}, (True, "::1", 9094)),
    (["--data-listen", "0.0.0.0"], {}, (True, "0.0.0.0", 0)),  # no port: the OS picks one
    (["--data-listen", ":9095"], {}, (True, "127.0.0.1", 9095)),
    ([], {"LOGBROKER_DATA_LISTEN": "off"}, (False, "", 0)),
    (["--data-listen", "127.0.0.1:9096"], {"LOGBROKER_DATA_LISTEN": "off"}, (True, "127.0.0.1", 9096)),
])
def test_data_listen(argv: list[str], environ: dict[str, str], expected: tuple[bool, str, int]):
    _, config = resolve(argv, environ)
    assert (config.data_listen_enabled, config.data_listen_host, config.data_listen_port) == expected


def test_data_listen_from_a_config_file(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text('data_listen = "off"\n')
    assert resolve(["--config", str(f)])[1].data_listen_enabled is False


@pytest.mark.parametrize("value", ["h:99999", "h:x", "h:-1", "[::1]:x"])
def test_a_bad_data_listen_fails(value: str):
    with pytest.raises(ConfigError, match="bad port|address"):
        resolve(["--data-listen", value])


def test_serve_help_names_each_default_once_and_the_readme_table_lists_every_flag():
    import re

    serve = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.values()
                 if a.prog.endswith(" serve"))
    for action in serve._actions:
        assert (action.help or "").count("default:") <= 1, action.help
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("### `logbroker serve`", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"^\| `(--[a-z0-9-]+)", table, re.M))
    missing = [s.flag for s in SERVE_SETTINGS if s.flag not in documented]
    assert not missing, f"serve flags missing from the README's serve table: {missing}"


def test_a_cluster_broker_needs_a_usable_cluster_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """No secret, a missing, an empty or a short file: refused at start with a one-line error, before
    anything listens; a good one from a flag, a config file or the environment."""
    with pytest.raises(ConfigError, match="--zookeeper needs --cluster-secret-file"):
        resolve(["--zookeeper", "zk:2181"])
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"cannot read cluster secret file {missing}"):
        resolve(["--zookeeper", "zk:2181", "--cluster-secret-file", str(missing)])
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve(["--zookeeper", "zk:2181", "--cluster-secret-file", str(empty)])
    short = tmp_path / "short"
    short.write_text("hunter2\n")
    with pytest.raises(ConfigError, match="at least 16"):
        resolve(["--zookeeper", "zk:2181", "--cluster-secret-file", str(short)])
    good = tmp_path / "good"
    good.write_text("0123456789abcdef0123\n")
    f = tmp_path / "c.toml"
    f.write_text(f'zookeeper = "zk:2181"\ncluster_secret_file = "{good}"\n')
    assert resolve(["--config", str(f)])[1].cluster_secret == b"0123456789abcdef0123"
    assert resolve([], {"LOGBROKER_ZOOKEEPER": "zk:2181", "LOGBROKER_CLUSTER_SECRET_FILE": str(good)}
                   )[1].cluster_secret == b"0123456789abcdef0123"
    assert resolve([])[1].cluster_secret == b""  # standalone: none needed (it refuses inter-broker calls)
    assert cli.main(["serve", "--zookeeper", "127.0.0.1:1", "--data-dir", str(tmp_path / "d")]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cluster-secret-file" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_offsets_topic_segment_bytes_flag_is_bounded():
    _, config = resolve(["--offsets-topic-segment-bytes", "65536"])
    assert config.coordinator.offsets_topic_segment_bytes == 65536
    with pytest.raises(ConfigError, match="offsets_topic_segment_bytes"):
        resolve(["--offsets-topic-segment-bytes", "100"])
