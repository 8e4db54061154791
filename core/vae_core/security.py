"""The rules for bearer tokens and PEM files, the same on both ends of a connection: what a
token may hold, how a token file is read, and how a PEM file is read and recognised.

Messages name the file and the setting it came from, never a token.
"""

from __future__ import annotations

import os
import ssl

CERTIFICATE = "certificate"
PRIVATE_KEY = "private key"
_MARKERS = {CERTIFICATE: b"-----BEGIN CERTIFICATE-----", PRIVATE_KEY: b"PRIVATE KEY-----"}
# The longest bearer token: gRPC refuses metadata past 8 KiB at random from 8 KiB on, and
# RESOURCE_EXHAUSTED from it reads as a full queue.
MAX_TOKEN = 4096
TOKEN_RULE = f"printable ASCII without spaces, at most {MAX_TOKEN} characters"


class SecurityFileError(ValueError):
    """A certificate, key or token file that cannot be read or does not hold what it should."""


def valid_token(token: str) -> bool:
    """Visible ASCII without spaces: what an HTTP/2 header value carries as it is; a space
    would make "Bearer TOKEN" ambiguous."""
    return 0 < len(token) <= MAX_TOKEN and all("!" <= c <= "~" for c in token)


def read_file(path: str | os.PathLike[str], setting: str) -> bytes:
    """The bytes of a file named by `setting` (a flag or an option, for the message)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SecurityFileError(f"cannot read {setting} {os.fspath(path)}: "
                                f"{exc.strerror or exc}") from None


def read_pem(path: str | os.PathLike[str], setting: str, kind: str = CERTIFICATE) -> bytes:
    """A PEM file's bytes, checked to hold at least one `kind` (CERTIFICATE or PRIVATE_KEY)."""
    data = read_file(path, setting)
    if _MARKERS[kind] not in data:
        raise SecurityFileError(f"{setting} {os.fspath(path)} holds no PEM {kind}")
    return data


def check_pair(cert: str | os.PathLike[str], key: str | os.PathLike[str], cert_setting: str,
               key_setting: str) -> None:
    """Refuse a certificate and key files that are not a usable pair (a key of another
    certificate, or an encrypted one): gRPC finds it only at the first handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise SecurityFileError(
            f"{cert_setting} {os.fspath(cert)} and {key_setting} {os.fspath(key)} are not a "
            f"usable pair (an encrypted key, or a key of another certificate?): "
            f"{exc.reason or exc}") from None


def check_ca(ca: bytes | str | os.PathLike[str], setting: str) -> None:
    """Refuse CA certificates, PEM bytes or a file, that OpenSSL cannot load."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if isinstance(ca, bytes):
            # Text outside the PEM blocks may be anything: OpenSSL reads the blocks alone.
            ctx.load_verify_locations(cadata=ca.decode("ascii", "ignore"))
        else:
            ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, ValueError) as exc:  # ValueError: no certificate in the bytes
        where = setting if isinstance(ca, bytes) else f"{setting} {os.fspath(ca)}"
        reason = getattr(exc, "reason", None) or exc
        raise SecurityFileError(f"{where}: not usable as CA certificates: {reason}") from None


def read_tokens(path: str | os.PathLike[str], setting: str) -> list[str]:
    """The tokens of a token file, one a line; blank lines and lines starting with # are
    skipped. Raises SecurityFileError for an unreadable file, text that is not UTF-8, a token
    that breaks the rule (by its line number), or a file without a token."""
    try:
        text = read_file(path, setting).decode("utf-8")
    except UnicodeDecodeError:
        raise SecurityFileError(f"{setting} {os.fspath(path)} is not UTF-8 text") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not valid_token(token):
            raise SecurityFileError(f"{setting} {os.fspath(path)}, line {number}: a token must "
                                    f"be {TOKEN_RULE}")
        tokens.append(token)
    if not tokens:
        raise SecurityFileError(f"{setting} {os.fspath(path)} holds no token (one a line; "
                                "blank lines and # comments are ignored)")
    return tokens
