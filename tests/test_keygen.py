"""keygen.py through its command line."""

import base64
import re
import subprocess
import sys

import pytest

from conftest import KEYGEN, ROOT
import mpudp

ALICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"


def keygen(*args, cwd=None):
    return subprocess.run([sys.executable, KEYGEN] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, cwd=cwd or ROOT, timeout=60)


def b64(hex_text):
    return base64.b64encode(bytes.fromhex(hex_text)).decode("ascii")


def test_prints_exactly_two_lines_with_32_byte_keys():
    result = keygen()
    assert result.returncode == 0
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    private_match = re.match(r"^Private Key \(Base64\): (\S+)$", lines[0])
    public_match = re.match(r"^Public Key \(Base64\): (\S+)$", lines[1])
    assert private_match and public_match, lines
    private = base64.b64decode(private_match.group(1), validate=True)
    public = base64.b64decode(public_match.group(1), validate=True)
    assert len(private) == 32 and len(public) == 32
    assert mpudp.public_key(private) == public
    # Clamped as RFC 7748 says.
    assert private[0] & 7 == 0 and private[31] & 0x80 == 0 and private[31] & 0x40


def test_two_runs_give_different_keys():
    first, second = keygen().stdout, keygen().stdout
    assert first.splitlines()[0] != second.splitlines()[0]


def test_works_from_another_directory(tmp_path):
    result = keygen(cwd=str(tmp_path))
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 2


def test_public_of_a_private_key_matches_the_pair():
    pair = keygen().stdout.splitlines()
    private_text = pair[0].split(": ", 1)[1]
    public_text = pair[1].split(": ", 1)[1]
    result = keygen("--public", private_text)
    assert result.returncode == 0
    assert result.stdout == public_text + "\n"


def test_public_of_rfc7748_alice():
    result = keygen("--public", b64(ALICE_PRIVATE))
    assert result.returncode == 0
    assert result.stdout.strip() == b64(ALICE_PUBLIC)


@pytest.mark.parametrize("bad", ["not-a-key", "AAAA", base64.b64encode(b"\x01" * 31).decode(), ""])
def test_bad_private_key_exits_2_without_traceback(bad):
    result = keygen("--public", bad)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("keygen: ")
