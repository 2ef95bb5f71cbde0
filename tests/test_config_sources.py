"""Where ``tcpecho serve`` takes its options from: the command line, ``TCPECHO_*`` variables,
a ``--config`` TOML file and the defaults, in that order, all made from one declaration.

Most cases run ``tcpecho.cli.main`` in this process with ``--print-config``, which reads every
source as a start would and prints the result as TOML; a few run the real commands.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest

from tcpecho import config
from tcpecho.cli import main
from tcpecho.config import OPTIONS, Option, ServerConfig
from tests.helpers import ROOT, ServerProcess, connect, recv_exactly

INTERNAL_FIELDS = {"worker", "listen_fds", "notify_socket"}
# Option values that must be of a particular form, for the options that need one.
NETWORK_SAMPLES: dict[str, tuple[str, ...]] = {
    "allow": ("192.0.2.0/24", "2001:db8::/32"),
    "deny": ("198.51.100.7",),
    "proxy_trusted": ("10.1.0.0/16",),
}
# HOST:PORT values.
ADDRESS_SAMPLES: dict[str, str] = {"metrics": "127.0.0.1:9109"}
# The other options an option's sample needs (ServerConfig checks one against the other), given
# on the command line beside it.
COMPANIONS: dict[str, list[str]] = {
    "proxy_protocol": ["--proxy-trusted", "10.1.0.0/16"],
    "tls_key": ["--tls-cert", "cert.pem"],
    "tls_cert": ["--tls-key", "key.pem"],
    "tls_client_ca": ["--tls-cert", "cert.pem", "--tls-key", "key.pem"],
}
SOURCES = ("command line", "env", "file")


@dataclass
class Given:
    """Options given in each place, and what ``tcpecho serve --print-config`` made of them."""

    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]
    args: list[str] = field(default_factory=list)
    file_lines: list[str] = field(default_factory=list)

    def set(self, where: str, option: Option, value: Any) -> None:
        """Give ``option`` the ``value`` on the command line, in the environment or the file."""
        if where == "command line":
            self.args += command_line(option, value)
        elif where == "env":
            self.monkeypatch.setenv(option.env, env_text(value))
        else:
            self.file_lines.append(f"{option.key} = {json.dumps(value)}")

    @property
    def file(self) -> Path:
        return self.tmp_path / "tcpecho.toml"

    def run(self, *args: str) -> tuple[int, str, str]:
        """``tcpecho serve --print-config`` with what was given: (exit code, stdout, stderr)."""
        if self.file_lines:
            self.file.write_text("\n".join(self.file_lines) + "\n")
            args = ("--config", str(self.file), *args)
        code = main(["serve", "--print-config", *self.args, *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def effective(self, *args: str) -> dict[str, tuple[Any, str]]:
        """Each option's value and source, by key, as --print-config printed them."""
        code, out, err = self.run(*args)
        assert code == 0, err
        return printed_config(out)

    def error(self, *args: str) -> str:
        """The one line of a configuration that is refused with exit code 2."""
        code, out, err = self.run(*args)
        assert code == 2, (code, out, err)
        assert out == ""
        assert err.count("\n") == 1, err
        assert err.startswith("Error: ")
        return err


@pytest.fixture
def given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Given:
    return Given(tmp_path, monkeypatch, capsys)


def printed_config(out: str) -> dict[str, tuple[Any, str]]:
    """--print-config's output: it must be TOML; each value line ends with its source."""
    values = tomllib.loads(out)
    sources = {}
    for line in out.splitlines():
        if not line.startswith("#"):
            key = line.split(" = ", 1)[0]
            sources[key] = line.rsplit("  # from: ", 1)[1]
    assert sources.keys() == values.keys()
    return {key: (values[key], sources[key]) for key in values}


def command_line(option: Option, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [option.flag if value else f"--no-{option.key}"]
    if isinstance(value, tuple):
        return [arg for item in value for arg in (option.flag, str(item))]
    return [option.flag, str(value)]


def env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def sample(option: Option) -> Any:
    """A value ``option`` accepts that is not its default."""
    value_type = option.type
    if option.name in NETWORK_SAMPLES:
        return NETWORK_SAMPLES[option.name]
    if option.name in ADDRESS_SAMPLES:
        return ADDRESS_SAMPLES[option.name]
    item: Any
    if value_type.choices:
        item = next(choice for choice in value_type.choices if choice != option.default)
    elif value_type.base is bool:
        item = not option.default
    elif value_type.base is int:
        item = option.default + 1 if option.default is not None else 1
    elif value_type.base is float:
        item = option.default + 1.5 if option.default is not None else 1.5
    else:
        item = "sample"
    return (item,) if value_type.repeatable else item


def source_label(where: str, option: Option, file: Path) -> str:
    return {"command line": "command line", "env": f"env {option.env}", "file": f"file {file}"}[
        where
    ]


# The declaration


def test_every_field_but_the_internal_ones_is_declared_once_as_an_option() -> None:
    names = [option.name for option in OPTIONS]
    assert len(names) == len(set(names))
    assert set(names) == {f.name for f in fields(ServerConfig)} - INTERNAL_FIELDS


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.key)
def test_the_sample_of_each_option_is_valid_and_not_its_default(option: Option) -> None:
    option.check(sample(option))
    assert sample(option) != option.default


@pytest.mark.parametrize("where", SOURCES)
@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.key)
def test_every_option_can_be_set_from_each_source(given: Given, option: Option, where: str) -> None:
    value = sample(option)
    given.set(where, option, value)
    printed, source = given.effective(*COMPANIONS.get(option.name, []))[option.key]
    assert (tuple(printed) if isinstance(printed, list) else printed) == value
    assert source == source_label(where, option, given.file)


def test_internal_fields_cannot_be_set_from_any_source(given: Given) -> None:
    given.monkeypatch.setenv("TCPECHO_WORKER", "3")
    assert "unknown option 'TCPECHO_WORKER' in the environment" in given.error()
    given.monkeypatch.delenv("TCPECHO_WORKER")
    given.file_lines.append("listen-fds = [3]")
    assert "unknown option 'listen-fds'" in given.error()
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--listen-fds", "3"])
    assert exited.value.code == 2


def test_help_lists_every_option_with_its_default_and_the_inverse_of_a_boolean(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for option in OPTIONS:
        assert option.flag in out
    assert "-q, --quiet, --no-quiet" in out
    assert "(default: 65432)" in out
    assert "--config FILE" in out
    assert "--print-config" in out


# Precedence: command line > environment > file > defaults

PORTS = {"command line": 1111, "env": 2222, "file": 3333}
PAIRS = [(high, low) for i, high in enumerate(SOURCES) for low in [*SOURCES[i + 1 :], "default"]]


@pytest.mark.parametrize(("high", "low"), PAIRS, ids=[f"{h} over {low}" for h, low in PAIRS])
def test_precedence_in_every_pair(given: Given, high: str, low: str) -> None:
    port = config.BY_NAME["port"]
    given.set(high, port, PORTS[high])
    if low != "default":
        given.set(low, port, PORTS[low])
    assert given.effective()["port"] == (PORTS[high], source_label(high, port, given.file))


def test_options_not_given_anywhere_keep_their_defaults(given: Given) -> None:
    given.set("file", config.BY_NAME["port"], 3333)
    printed = given.effective()
    assert printed["host"] == (["0.0.0.0"], "default")
    assert printed["max-connections"] == (1024, "default")


def test_a_list_from_a_higher_source_replaces_the_lower_ones_whole(given: Given) -> None:
    allow = config.BY_NAME["allow"]
    given.set("file", allow, ("10.0.0.0/8", "172.16.0.0/12"))
    given.set("env", allow, ("192.168.0.0/16",))
    assert given.effective()["allow"] == (["192.168.0.0/16"], "env TCPECHO_ALLOW")
    assert given.effective("--allow", "127.0.0.1")["allow"] == (["127.0.0.1"], "command line")


def test_the_command_line_can_turn_off_a_boolean_the_file_turned_on(given: Given) -> None:
    given.file_lines.append("quiet = true")
    assert given.effective()["quiet"] == (True, f"file {given.file}")
    assert given.effective("--no-quiet")["quiet"] == (False, "command line")


def test_tcpecho_config_names_the_file_when_config_is_not_given(given: Given) -> None:
    other = given.tmp_path / "other.toml"
    other.write_text("port = 4444\n")
    given.monkeypatch.setenv("TCPECHO_CONFIG", str(other))
    assert given.effective()["port"] == (4444, f"file {other}")
    given.file_lines.append("port = 5555")
    assert given.effective()["port"] == (5555, f"file {given.file}")


# The environment's lists and booleans


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8,192.168.0.0/16", ("10.0.0.0/8", "192.168.0.0/16")),
        ("10.0.0.0/8 192.168.0.0/16", ("10.0.0.0/8", "192.168.0.0/16")),
        (" 10.0.0.0/8 ,\t192.168.0.0/16, ", ("10.0.0.0/8", "192.168.0.0/16")),
        ("::1", ("::1",)),
        ("", ()),
    ],
)
def test_an_environment_list_is_split_at_commas_and_spaces(
    text: str, expected: tuple[str, ...]
) -> None:
    resolved = config.resolve({}, {"TCPECHO_ALLOW": text})
    assert resolved.config.allow == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("YES", True), ("0", False), ("False", False), ("no", False)],
)
def test_an_environment_boolean_is_1_0_true_false_yes_or_no(text: str, expected: bool) -> None:
    assert config.resolve({}, {"TCPECHO_QUIET": text}).config.quiet is expected


def test_variables_without_the_prefix_are_not_read() -> None:
    resolved = config.resolve({}, {"PORT": "1", "tcpecho_port": "2", "HOME": "/root"})
    assert resolved.config == ServerConfig()


# Errors: one line naming the source, the option and the reason; exit code 2

FILE_ERRORS = [
    ("max_connections = 5", ["unknown option 'max_connections'", "closest is max-connections"]),
    ('port = "80"', ["invalid port '80'", "must be an integer, not a string"]),
    ("port = 70000", ["invalid port 70000", "must be 0 to 65535"]),
    ("max-connections = 0", ["invalid max-connections 0", "must be at least 1"]),
    ("write-timeout = 0", ["invalid write-timeout 0.0", "must be more than 0"]),
    ('engine = "fibers"', ["invalid engine 'fibers'", "choose from threads, asyncio"]),
    ("allow = 8", ["invalid allow 8", "must be an array, not an integer"]),
    ('deny = ["10.0.0.0/8", "x"]', ["invalid deny 'x'", "not an IP address or CIDR network"]),
    ("quiet = 1", ["invalid quiet 1", "must be a boolean"]),
    ("[serve]\nport = 80", ["unknown option 'serve'", "at the top level, not in a table"]),
    ('proxy-protocol = "on"', ["invalid proxy-protocol 'on'", "with --proxy-trusted CIDR"]),
    ('tls-key = "key.pem"', ["invalid tls-key 'key.pem'", "needs --tls-cert"]),
]


@pytest.mark.parametrize(("content", "texts"), FILE_ERRORS, ids=[c for c, _ in FILE_ERRORS])
def test_a_bad_file_value_names_the_file_the_key_and_the_reason(
    given: Given, content: str, texts: list[str]
) -> None:
    given.file_lines.append(content)
    line = given.error()
    assert f" in {given.file}: " in line
    for text in texts:
        assert text in line


ENV_ERRORS = [
    ("TCPECHO_MAX_CONECTIONS", "5", ["unknown option", "closest is TCPECHO_MAX_CONNECTIONS"]),
    ("TCPECHO_PORT", "http", ["invalid TCPECHO_PORT 'http'", "not an integer"]),
    ("TCPECHO_PORT", "-1", ["invalid TCPECHO_PORT -1", "must be 0 to 65535"]),
    ("TCPECHO_DRAIN_TIMEOUT", "soon", ["invalid TCPECHO_DRAIN_TIMEOUT", "not a number"]),
    ("TCPECHO_QUIET", "maybe", ["invalid TCPECHO_QUIET 'maybe'", "not a boolean"]),
    ("TCPECHO_LOOP", "trio", ["invalid TCPECHO_LOOP 'trio'", "choose from auto, asyncio"]),
    ("TCPECHO_ALLOW", "10.0.0.0/8,bad", ["invalid TCPECHO_ALLOW 'bad'", "not an IP address"]),
    ("TCPECHO_TLS_CLIENT_CA", "ca.pem", ["invalid TCPECHO_TLS_CLIENT_CA", "needs --tls-cert"]),
]


@pytest.mark.parametrize(("var", "text", "texts"), ENV_ERRORS, ids=[v for v, _, _ in ENV_ERRORS])
def test_a_bad_environment_variable_is_named_with_the_reason(
    given: Given, var: str, text: str, texts: list[str]
) -> None:
    given.monkeypatch.setenv(var, text)
    line = given.error()
    assert " in the environment: " in line
    for expected in texts:
        assert expected in line


def test_a_bad_value_is_refused_even_where_a_higher_source_overrides_it(given: Given) -> None:
    given.file_lines.append("max-connections = 0")
    assert "max-connections 0 in " in given.error("--max-connections", "5")
    given.file_lines.clear()
    given.monkeypatch.setenv("TCPECHO_PORT", "99999")
    assert "TCPECHO_PORT 99999 in the environment" in given.error("--port", "1")


def test_a_bad_command_line_value_names_the_flag(given: Given) -> None:
    assert given.error("--port", "70000") == "Error: invalid --port 70000: must be 0 to 65535.\n"


def test_a_missing_config_file_is_one_line(given: Given) -> None:
    missing = given.tmp_path / "missing.toml"
    line = given.error("--config", str(missing))
    assert line == (
        f"Error: cannot read the configuration file {missing}: No such file or directory.\n"
    )


def test_a_config_file_that_cannot_be_read_is_one_line(given: Given) -> None:
    line = given.error("--config", str(given.tmp_path))
    assert f"cannot read the configuration file {given.tmp_path}: Is a directory" in line


def test_a_missing_file_named_by_tcpecho_config_is_one_line(given: Given) -> None:
    given.monkeypatch.setenv("TCPECHO_CONFIG", str(given.tmp_path / "gone.toml"))
    assert "gone.toml: No such file or directory" in given.error()


def test_a_toml_syntax_error_names_the_file_the_line_and_the_reason(given: Given) -> None:
    given.file_lines += ["port = 7000", "host = 127.0.0.1"]
    line = given.error()
    assert f"cannot read the configuration file {given.file}: invalid TOML: " in line
    assert "(at line 2, column 13)" in line


def test_a_config_file_that_is_not_utf8_is_one_line(given: Given) -> None:
    given.file.write_bytes(b'confirm-prefix = "\xff"\n')
    assert f"{given.file}: not UTF-8 text" in given.error("--config", str(given.file))


# --print-config


def test_print_config_reads_back_into_the_same_configuration(given: Given) -> None:
    """Every option away from its default, a prefix full of what TOML must escape: the output
    given as --config makes the same ServerConfig."""
    for option in OPTIONS:
        given.set("command line", option, sample(option))
    given.args += ["--confirm-prefix", 'q"uote \\ tab\t del\x7f nul\x00 é ✓ 😀: ']
    code, out, err = given.run()
    assert code == 0, err
    expected = config.resolve(
        {o.name: sample(o) for o in OPTIONS}
        | {"confirm_prefix": 'q"uote \\ tab\t del\x7f nul\x00 é ✓ 😀: '},
        {},
    ).config
    printed = given.tmp_path / "printed.toml"
    printed.write_text(out)
    again = config.resolve({}, {}, str(printed))
    assert again.config == expected
    assert set(again.sources.values()) == {f"file {printed}"}


def test_print_config_writes_nothing_else_and_does_not_listen(given: Given) -> None:
    """It exits 0 at once, with no banner, even for a port that no one could bind."""
    code, out, err = given.run("--host", "192.0.2.1", "--port", "1")
    assert (code, err) == (0, "")
    assert "SERVER STARTING" not in out
    assert out.startswith("# The effective configuration of tcpecho serve")


def test_a_path_with_a_newline_stays_on_its_comment_line(given: Given) -> None:
    odd = given.tmp_path / "odd\nname.toml"
    odd.write_text("port = 7\n")
    code, out, err = given.run("--config", str(odd))
    assert code == 0, err
    assert printed_config(out)["port"] == (7, "file " + str(odd).replace("\n", "\\n"))


# The docs


def options_table_in_docs() -> str:
    text = (ROOT / "docs" / "configuration.md").read_text()
    start = text.index(config.TABLE_START)
    end = text.index(config.TABLE_END) + len(config.TABLE_END) + 1
    return text[start:end]


def test_the_docs_options_table_is_the_one_made_from_the_declaration() -> None:
    """If this fails, run scripts/gen-config-docs."""
    assert options_table_in_docs() == config.options_table()


def test_the_docs_table_has_a_row_for_each_option() -> None:
    rows = options_table_in_docs().splitlines()[3:-1]
    assert len(rows) == len(OPTIONS)
    for row, option in zip(rows, OPTIONS, strict=True):
        assert f"`{option.env}`" in row


def test_the_example_file_in_the_docs_is_valid(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    match = re.search(r"```toml\n(.*?)```", text, re.DOTALL)
    assert match
    example = tmp_path / "example.toml"
    example.write_text(match[1])
    resolved = config.resolve({}, {}, str(example))
    assert resolved.config.port == 7007
    assert resolved.config.quiet


# Real commands


SERVE = (sys.executable, "-m", "tcpecho", "serve")


def environment(**variables: str) -> dict[str, str]:
    """This process's environment (without TCPECHO_*: see conftest) and ``variables``, with
    src/ on the path so that ``python -m tcpecho`` runs this tree."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), **variables}


def test_python_m_tcpecho_print_config_with_a_file_the_environment_and_arguments(
    tmp_path: Path,
) -> None:
    file = tmp_path / "tcpecho.toml"
    file.write_text('port = 7007\nengine = "asyncio"\nallow = ["10.0.0.0/8"]\nquiet = true\n')
    result = subprocess.run(
        [*SERVE, "--print-config", "--config", str(file), "--no-quiet"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        env=environment(TCPECHO_PORT="7008", TCPECHO_FRAMING="line"),
    )
    assert (result.returncode, result.stderr) == (0, "")
    printed = printed_config(result.stdout)
    assert printed["port"] == (7008, "env TCPECHO_PORT")
    assert printed["framing"] == ("line", "env TCPECHO_FRAMING")
    assert printed["engine"] == ("asyncio", f"file {file}")
    assert printed["allow"] == (["10.0.0.0/8"], f"file {file}")
    assert printed["quiet"] == (False, "command line")
    assert printed["host"] == (["0.0.0.0"], "default")


def test_tcp_server_py_serves_where_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TCPECHO_HOST", "127.0.0.1")
    monkeypatch.setenv("TCPECHO_PORT", "0")
    monkeypatch.setenv("TCPECHO_FRAMING", "line")
    monkeypatch.setenv("TCPECHO_REPLY", "confirm")
    with ServerProcess() as server:
        port = server.wait_listening()
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"env\n")
            assert recv_exactly(sock, 21) == b"Server received: env\n"
        server.proc.terminate()
        assert server.proc.wait(timeout=10) == 0


def test_tcp_server_py_with_a_bad_file_exits_2_with_one_line(
    tmp_path: Path,
) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("max-connections = 0\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tcp_server.py"), "--config", str(file)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        env=environment(),
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"Error: invalid max-connections 0 in {file}: must be at least 1.\n"
