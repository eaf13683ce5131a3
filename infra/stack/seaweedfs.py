"""SeaweedFS's ``security.toml`` for the local stack: the S3 gateway, with its keys, is the only way in.

SeaweedFS reads the file from its working directory (``$HEADBENCH_HOME``). It holds:

- JWT signing keys (``[jwt.signing]``, ``[jwt.signing.read]`` for the volume servers, ``[jwt.filer_signing]``,
  ``[jwt.filer_signing.read]`` for the filer's HTTP API): a request without a token signed with them is 401;
- mutual TLS for every gRPC port (``[grpc]`` and one section per component): a private CA made at the first
  ``up`` signs one certificate that every component presents and accepts (``allowed_commonNames``), so a
  client without it (``weed shell`` from another folder, any gRPC call) cannot complete a handshake.

The master's and filer's HTTP APIs and the admin UI are switched off on the command line (``infra.stack.local``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
# every gRPC server SeaweedFS runs in `weed mini`, and the client side all of them use (`weed scaffold
# -config=security` lists them)
GRPC_SERVERS = ("master", "volume", "filer", "s3", "msg_broker", "msg_agent", "admin", "worker", "mq")
COMMON_NAME = "headbench-seaweedfs"
JWT_EXPIRY_S = 10  # a signed request is valid this long (SeaweedFS's own default)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def ensure_grpc_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, certificate, key) under ``folder`` (0700), made once: an EC P-256 CA valid for 10
    years and one certificate for 127.0.0.1 signed by it, for server and client use."""
    ca_path, cert_path, key_path = folder / "ca.crt", folder / "tls.crt", folder / "tls.key"
    if ca_path.is_file() and cert_path.is_file() and key_path.is_file():
        return ca_path, cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=3650)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (builder("headbench-local-ca", name("headbench-local-ca"), ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (builder(COMMON_NAME, ca.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # the CA's key is not kept: no other certificate is ever signed
    _write_private(ca_path, ca.public_bytes(serialization.Encoding.PEM))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def security_toml(jwt_keys: dict[str, str], ca: Path, cert: Path, key: Path) -> str:
    """The file's text: the JWT keys (one per ``JWT_SECTIONS`` entry) and mutual TLS on every gRPC port."""
    jwt = "".join(f'[{section}]\nkey = "{jwt_keys[section]}"\nexpires_after_seconds = {JWT_EXPIRY_S}\n'
                  for section in JWT_SECTIONS)
    grpc = f'[grpc]\nca = "{ca}"\n' + "".join(
        f'[grpc.{server}]\ncert = "{cert}"\nkey = "{key}"\nallowed_commonNames = "{COMMON_NAME}"\n'
        for server in GRPC_SERVERS) + f'[grpc.client]\ncert = "{cert}"\nkey = "{key}"\n'
    return jwt + grpc
