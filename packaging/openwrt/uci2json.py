#!/usr/bin/env python3
"""uci2json.py: mpudp's UCI config (/etc/config/mpudp) as the JSON files mpudp.py reads.

The OpenWrt init script runs it; it reads the UCI file itself, so it needs
neither `uci` nor mpudp.py, and only python3-light.

    uci2json.py [--uci FILE] sections             the name of each enabled section, one a line
    uci2json.py [--uci FILE] convert NAME OUT     section NAME as mpudp JSON in OUT (atomically,
                                                  mode 600); prints "USER [CAPABILITY...]": whom
                                                  it runs as, and what the config needs
    uci2json.py caps JSONFILE                     the capabilities a JSON config needs
    --bytecode MPUDP_PY (with any of them)        compile MPUDP_PY's bytecode cache for this
                                                  Python, if it is missing or stale

Exit status 0; 2 with one line per bad option (1 if the file cannot be read or parsed), each named as uci names it
(`mpudp.client.heartbeat_interval_sec: 'fast' is not a number`).  Ranges, keys
and addresses are left to `mpudp.py --check`, which the init script runs on OUT.

A section (one per relay instance; the instance and its files take its name):

    config mpudp 'client'
        option enabled '1'
        option mode 'client'                  # or 'server'
        option user 'mpudp'                   # the default; 'root' only if asked
        option listen_addr '127.0.0.1:8999'
        list link 'frp-a.example.net:7000 dev eth1'
        list link '198.51.100.7:7000 priority 20 mark 0x64 from 192.0.2.7'
        option client_private_key_file '/etc/mpudp/client.key'
        option server_public_key 'BASE64...'

or one that names a JSON config file:  option config '/etc/mpudp/server.json'.
"""

import argparse
import difflib
import importlib.util
import json
import os
import py_compile
import re
import shlex
import sys
from typing import Dict, List, Optional, Sequence, Tuple

UCI_FILE = "/etc/config/mpudp"
RUN_DIR = "/var/run/mpudp"  # RAM; NAME/status.json is written by the daemon
SECTION_TYPE = "mpudp"
DEFAULT_USER = "mpudp"

# UCI option -> type; the JSON key is the option's name.
COMMON_OPTIONS = {
    "listen_addr": "str", "debug": "bool", "log_target": "str", "session_timeout_sec": "number",
    "max_sessions": "int", "dns_refresh_interval_sec": "number",
}
MODE_OPTIONS = {
    "server": dict(COMMON_OPTIONS, upstream_addr="str", heartbeat_timeout_sec="number", status_file="str"),
    "client": dict(COMMON_OPTIONS, redundancy="redundancy", heartbeat_interval_sec="number",
                   loss_weight="number", rtt_weight="number", switch_threshold="number",
                   throughput_threshold_kbps="number", max_consecutive_fail="int", client_id="int",
                   score_file="str"),
}
# Keys: option NAME (the base64 text) or option NAME_file (a file holding it).
MODE_KEYS = {
    "server": {"server_private_key": "Private"},
    "client": {"client_private_key": "Private", "server_public_key": "Public"},
}
MODE_STATUS_KEY = {"server": "status_file", "client": "score_file"}
META_OPTIONS = ("enabled", "mode", "user", "config")
LINK_WORDS = {"priority": "priority", "dev": "bind_interface", "mark": "fwmark", "from": "bind_addr"}
TRUE_WORDS = ("1", "true", "yes", "on", "enabled")
FALSE_WORDS = ("0", "false", "no", "off", "disabled")


class UciError(Exception):
    """One or more bad options; one line each."""


class Section:
    """One `config TYPE 'NAME'` block: its options (str) and lists ([str]), in file order."""

    def __init__(self, type_: str, name: str, line: int) -> None:
        self.type, self.name, self.line = type_, name, line
        self.options = {}  # type: Dict[str, str]
        self.lists = {}  # type: Dict[str, List[str]]

    def path(self, option: str) -> str:
        return "%s.%s.%s" % (SECTION_TYPE, self.name, option)

    def names(self) -> List[str]:
        return list(self.options) + list(self.lists)


# -- reading UCI ---------------------------------------------------------------


def parse_uci(text: str, source: str = UCI_FILE) -> List[Section]:
    """The sections of a UCI file (uci's own syntax: shell-like quoting, # comments)."""
    sections, errors = [], []  # type: List[Section], List[str]
    for number, line in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            errors.append("%s:%d: %s" % (source, number, exc))
            continue
        if not words or words[0] == "package":
            continue
        if words[0] == "config" and len(words) in (2, 3):
            sections.append(Section(words[1], words[2] if len(words) == 3 else "", number))
        elif words[0] in ("option", "list") and len(words) == 3 and sections:
            _add_value(sections[-1], words[0], words[1], words[2])
        else:
            errors.append("%s:%d: not a UCI line: %s" % (source, number, line.strip()))
    if errors:
        raise UciError("\n".join(errors))
    return sections


def _add_value(section: Section, kind: str, name: str, value: str) -> None:
    if kind == "option":
        section.options[name] = value
        section.lists.pop(name, None)
    else:
        section.lists.setdefault(name, []).append(value)
        section.options.pop(name, None)


def read_uci(path: str) -> List[Section]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UciError("%s: cannot read: %s" % (path, exc.strerror or exc)) from None
    return parse_uci(text, path)


def mpudp_sections(sections: Sequence[Section]) -> Tuple[List[Section], List[str]]:
    """The sections of type mpudp, and a line for each one that cannot be an instance."""
    found, errors = [], []
    for section in sections:
        if section.type != SECTION_TYPE:
            errors.append("line %d: config %s: unknown section type (mpudp reads `config mpudp 'NAME'`)"
                          % (section.line, section.type))
        elif not re.match(r"^[A-Za-z0-9_]+$", section.name):
            errors.append("line %d: config mpudp %r: needs a name of letters, digits and _"
                          " (it names the instance and its files): config mpudp 'client'"
                          % (section.line, section.name))
        else:
            found.append(section)
    return found, errors


def find_section(sections: Sequence[Section], name: str) -> Section:
    for section in mpudp_sections(sections)[0]:
        if section.name == name:
            return section
    raise UciError("%s.%s: no such section" % (SECTION_TYPE, name))


# -- values --------------------------------------------------------------------


def uci_bool(section: Section, option: str, default: bool) -> bool:
    value = section.options.get(option)
    if value is None or value == "":
        return default
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise UciError("%s: %r is not a boolean (1 or 0)" % (section.path(option), value))


def run_as(section: Section) -> str:
    user = section.options.get("user") or DEFAULT_USER
    if not re.match(r"^[a-z_][a-z0-9_-]*$", user):
        raise UciError("%s: %r is not a user name" % (section.path("user"), user))
    return user


def convert_value(path: str, kind: str, value: str):
    """A UCI string as the JSON value of `kind`; UciError naming `path` if it is not one."""
    if kind == "str":
        return value
    if kind == "bool":
        if value.lower() in TRUE_WORDS + FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        raise UciError("%s: %r is not a boolean (1 or 0)" % (path, value))
    if kind == "redundancy" and value == "auto":
        return value
    if kind in ("int", "redundancy"):
        try:
            return int(value, 10)
        except ValueError:
            raise UciError("%s: %r is not a whole number" % (path, value)) from None
    return _number(path, value)


def _number(path: str, value: str):
    try:
        return int(value, 10)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number != number or number in (float("inf"), float("-inf")):
        raise UciError("%s: %r is not a number" % (path, value))
    return number


def parse_link(path: str, text: str) -> dict:
    """'<remote_addr>[ priority N][ dev IF][ mark M][ from ADDR]' as a client.links entry."""
    words = text.split()
    if not words:
        raise UciError("%s: empty; needs '<remote_addr>[ priority N][ dev IF][ mark M][ from ADDR]'" % path)
    link = {"remote_addr": words[0]}
    rest = words[1:]
    where = "%s '%s'" % (path, text)
    while rest:
        word, rest = rest[0], rest[1:]
        if word not in LINK_WORDS:
            close = difflib.get_close_matches(word, LINK_WORDS, 1)
            raise UciError("%s: unknown word %r%s (known: priority, dev, mark, from)" % (
                where, word, "; did you mean %r?" % close[0] if close else ""))
        if not rest:
            raise UciError("%s: %r needs a value" % (where, word))
        if LINK_WORDS[word] in link:
            raise UciError("%s: %r given twice" % (where, word))
        link[LINK_WORDS[word]] = _link_value(where, word, rest[0])
        rest = rest[1:]
    return link


def _link_value(where: str, word: str, value: str):
    if word == "priority":
        return _number("%s: priority" % where, value)
    if word == "mark":
        try:
            return int(value, 0)
        except ValueError:
            raise UciError("%s: mark %r is not a number (decimal, or hex as 0x64)" % (where, value)) from None
    return value


def read_key_file(path: str, option: str, which: str) -> str:
    """The key in a file: one line of base64, or keygen.py's output (its `which` Key line)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as exc:
        raise UciError("%s: cannot read %s: %s" % (option, path, exc.strerror or exc)) from None
    label = "%s Key (Base64):" % which
    for line in lines:
        if line.startswith(label):
            return line[len(label):].strip()
    if len(lines) == 1 and ":" not in lines[0]:
        return lines[0]
    raise UciError("%s: %s holds no %s key (one line of base64, or what keygen.py prints)"
                   % (option, path, which.lower()))


# -- a section as mpudp JSON ---------------------------------------------------


def section_config(section: Section, run_dir: str = RUN_DIR) -> dict:
    """The mpudp config of one UCI section; UciError with a line per bad option."""
    if "config" in section.options:
        return _named_json_file(section)
    mode = section.options.get("mode", "")
    if mode not in MODE_OPTIONS:
        raise UciError("%s: %s" % (section.path("mode"), "must be 'client' or 'server'" if mode
                                   else "is required: 'client' or 'server' (or option config '/path/to.json')"))
    errors = []  # type: List[str]
    body = {}  # type: Dict[str, object]
    for name in section.names():
        try:
            _convert_option(section, mode, name, body)
        except UciError as exc:
            errors.append(str(exc))
    if errors:
        raise UciError("\n".join(errors))
    body.setdefault("log_target", "syslog")  # tagged mpudp[PID] in logread, at its own level
    body.setdefault(MODE_STATUS_KEY[mode], os.path.join(run_dir, section.name, "status.json"))
    return {"mode": mode, mode: body}


def _convert_option(section: Section, mode: str, name: str, body: dict) -> None:
    path = section.path(name)
    options, keys = MODE_OPTIONS[mode], MODE_KEYS[mode]
    if name in META_OPTIONS:
        return
    if name in options:
        if name in section.lists:
            raise UciError("%s: is a list; give it as one option" % path)
        if section.options[name] != "":
            body[name] = convert_value(path, options[name], section.options[name])
    elif name in keys or (name.endswith("_file") and name[:-5] in keys):
        _convert_key(section, name[:-5] if name.endswith("_file") else name, keys, body)
    elif name == "link" and mode == "client":
        values = section.lists.get(name) or [section.options[name]]
        body["links"] = [parse_link(path, value) for value in values]
    elif name in ("client_public_key", "upstream_addrs") and mode == "server":
        values = section.lists.get(name) or [section.options[name]]
        body["client_public_keys" if name == "client_public_key" else name] = values
    else:
        known = list(options) + list(keys) + [k + "_file" for k in keys] + list(META_OPTIONS) + (
            ["link"] if mode == "client" else ["client_public_key", "upstream_addrs"])
        close = difflib.get_close_matches(name, known, 1)
        raise UciError("%s: not an option of a %s%s" % (
            path, mode, "; did you mean %r?" % close[0] if close else ""))


def _convert_key(section: Section, key: str, keys: Dict[str, str], body: dict) -> None:
    if key in body:
        return  # done when its other spelling was seen
    if key in section.options and key + "_file" in section.options:
        raise UciError("%s: give %s or %s_file, not both" % (section.path(key), key, key))
    if key + "_file" in section.options:
        path = section.options[key + "_file"]
        body[key] = read_key_file(path, section.path(key + "_file"), keys[key])
    else:
        body[key] = section.options[key]


def _named_json_file(section: Section) -> dict:
    path = section.options["config"]
    extra = [name for name in section.names() if name not in META_OPTIONS or name == "mode"]
    if extra:
        raise UciError("\n".join("%s: not used with option config (%s holds the whole config)"
                                 % (section.path(name), path) for name in extra))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise UciError("%s: cannot read %s: %s" % (section.path("config"), path, exc.strerror or exc)) from None
    except ValueError as exc:
        raise UciError("%s: %s is not valid JSON: %s" % (section.path("config"), path, exc)) from None
    if not isinstance(data, dict):
        raise UciError("%s: %s must hold a JSON object" % (section.path("config"), path))
    return data


def write_atomically(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, mode 600."""
    tmp = "%s.tmp%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- what a config needs from the kernel ----------------------------------------


def capabilities(config: dict, kernel_release: str) -> List[str]:
    """The capabilities the daemon needs for `config` on a kernel of this release.

    fwmark (SO_MARK): CAP_NET_ADMIN.  bind_interface (SO_BINDTODEVICE): CAP_NET_RAW
    before Linux 5.7.  A port below 1024 to listen on or bind to: CAP_NET_BIND_SERVICE."""
    mode = config.get("mode")
    section = config.get(mode) if isinstance(config.get(mode), dict) else {}
    needed = set()
    if _port(section.get("listen_addr")) in range(1, 1024):
        needed.add("CAP_NET_BIND_SERVICE")
    links = section.get("links") if mode == "client" and isinstance(section.get("links"), list) else []
    for link in links:
        if not isinstance(link, dict):
            continue
        if link.get("fwmark") not in (None, 0, "0", "", "0x0"):
            needed.add("CAP_NET_ADMIN")
        if link.get("bind_interface") and _kernel(kernel_release) < (5, 7):
            needed.add("CAP_NET_RAW")
        if _port(link.get("bind_addr")) in range(1, 1024):
            needed.add("CAP_NET_BIND_SERVICE")
    return sorted(needed)


def _port(address) -> int:
    if not isinstance(address, str):
        return 0
    if address.startswith("["):
        tail = address.partition("]")[2]
        port = tail[1:] if tail.startswith(":") else ""
    else:
        port = address.rpartition(":")[2] if address.count(":") == 1 else ""
    return int(port) if port.isdigit() else 0


def _kernel(release: str) -> Tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", release)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


# -- bytecode --------------------------------------------------------------------


def ensure_bytecode(source: str) -> bool:
    """Compile `source`'s __pycache__ entry for this Python if missing or stale; True if written.

    OpenWrt's Python never writes bytecode itself, and a daemon without it costs
    ~7 MB more; after a Python upgrade the old cache is for the wrong version."""
    cache = importlib.util.cache_from_source(source)
    st = os.stat(source)
    expected = (importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
                + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
                + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little"))
    try:
        with open(cache, "rb") as f:
            if f.read(16) == expected:
                return False
    except OSError:
        pass
    py_compile.compile(source, cfile=cache, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    return True


# -- command line ------------------------------------------------------------------


def cmd_sections(args) -> int:
    """The name of each enabled section; one whose `enabled` is bad is named too (and
    refused by convert), so the init script keeps its running instance."""
    try:
        sections, errors = mpudp_sections(read_uci(args.uci))
    except UciError as exc:
        sys.stderr.write("%s\n" % exc)
        return 1  # no section can be trusted: the init script changes nothing
    for section in sections:
        try:
            enabled = uci_bool(section, "enabled", True)
        except UciError as exc:
            errors.append(str(exc))
            enabled = True
        if enabled:
            print(section.name)
    for line in errors:
        sys.stderr.write(line + "\n")
    return 2 if errors else 0


def cmd_convert(args) -> int:
    section = find_section(read_uci(args.uci), args.name)
    errors = []  # type: List[str]
    _collect(errors, uci_bool, section, "enabled", True)
    user = _collect(errors, run_as, section)
    config = _collect(errors, section_config, section, args.run_dir)
    if errors:
        raise UciError("\n".join(errors))
    write_atomically(args.out, json.dumps(config, indent=2) + "\n")
    print(" ".join([user] + capabilities(config, args.kernel)))
    return 0


def _collect(errors: List[str], function, *args):
    """function(*args), or None with its UciError's lines added to `errors`: every bad option at once."""
    try:
        return function(*args)
    except UciError as exc:
        errors.append(str(exc))
        return None


def cmd_caps(args) -> int:
    try:
        with open(args.json, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise UciError("%s: %s" % (args.json, exc)) from None
    print(" ".join(capabilities(config if isinstance(config, dict) else {}, args.kernel)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uci2json.py", description="mpudp's UCI config as mpudp JSON.")
    parser.add_argument("--uci", default=UCI_FILE, help="the UCI file (default %s)" % UCI_FILE)
    parser.add_argument("--run-dir", default=RUN_DIR, help="where NAME/status.json goes (default %s)" % RUN_DIR)
    parser.add_argument("--kernel", default=os.uname().release, help="kernel release (default: this one)")
    parser.add_argument("--bytecode", metavar="MPUDP_PY", help="compile its bytecode cache if missing or stale")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("sections", help="the name of each enabled section")
    convert = sub.add_parser("convert", help="write section NAME as JSON to OUT; print USER [CAPABILITY...]")
    convert.add_argument("name")
    convert.add_argument("out")
    caps = sub.add_parser("caps", help="the capabilities a JSON config needs")
    caps.add_argument("json")
    return parser


COMMANDS = {"sections": cmd_sections, "convert": cmd_convert, "caps": cmd_caps}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bytecode:
        try:
            ensure_bytecode(args.bytecode)
        except (OSError, py_compile.PyCompileError) as exc:
            sys.stderr.write("uci2json.py: no bytecode cache for %s: %s\n" % (args.bytecode, exc))
    if args.command is None:
        return 0
    try:
        return COMMANDS[args.command](args)
    except UciError as exc:
        sys.stderr.write("%s\n" % exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
