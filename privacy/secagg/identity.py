"""Node signing keys for SecAgg+'s malicious-server variant (Bonawitz et al., CCS 2017, sec. 6;
Bell et al., CCS 2020, sec. 4): each node signs its round keys and the survivor set it saw,
and checks its peers' signatures against the federation's keyring.

Keys are Ed25519 (RFC 8032, `cryptography`): a node's private key never leaves its kit
(`secagg.key`, PKCS#8 PEM, mode 0600); the keyring (`federation-keys.json`) maps every node
name of the federation to its 32-byte public key (hex). `fedpriv provision` writes both into
each node kit; a simulation writes them into its run folder the same way
(`write_identities`). Ed25519 rather than the nodes' P-384 Flower keys: one key per purpose,
and a node verifies up to n signatures a stage (Ed25519 verifies in about 0.1 ms).

Assumption, stated wherever the guarantee is: the party that made the kits is not the
coordinator that runs the rounds (or the sites re-key after provisioning); a coordinator
holding a node's private key can sign as that node.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_FILE = "secagg.key"
KEYRING_FILE = "federation-keys.json"


class IdentityError(ValueError):
    """A key or keyring file is missing or malformed (the message names the file)."""


@dataclass(frozen=True)
class SigningIdentity:
    """This node's name, its Ed25519 signing key, and the federation's public keys by name."""

    name: str
    private_key: Ed25519PrivateKey
    keyring: Mapping[str, Ed25519PublicKey]

    def sign(self, message: bytes) -> bytes:
        """64-byte Ed25519 signature of `message`."""
        return self.private_key.sign(message)

    def verifies(self, signer: str, message: bytes, signature: bytes) -> bool:
        """True iff `signer` is in the keyring and `signature` is its signature of `message`."""
        key = self.keyring.get(signer)
        if key is None:
            return False
        try:
            key.verify(bytes(signature), message)
        except (InvalidSignature, ValueError):
            return False
        return True


def _public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def write_private_key(path: Path) -> str:
    """Create an Ed25519 key at `path` (0600) unless one exists; returns its public key (hex)."""
    path = Path(path)
    if path.exists():
        return _public_hex(_read_private_key(path))
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return _public_hex(key)


def write_keyring(path: Path, public_keys: Mapping[str, str]) -> None:
    """Write {name: public key hex} as the federation keyring (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"ed25519": dict(sorted(public_keys.items()))}, indent=2) + "\n")
    os.replace(tmp, path)


def write_identities(folder: Path, names: list[str]) -> dict[str, Path]:
    """Simulation: one key per name under `folder/<name>/` plus `folder/federation-keys.json`.

    Returns name -> that node's folder (pass it to `load_identity`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    homes, public = {}, {}
    for name in names:
        home = folder / name
        home.mkdir(exist_ok=True, mode=0o700)
        public[name] = write_private_key(home / KEY_FILE)
        homes[name] = home
    for home in homes.values():
        write_keyring(home / KEYRING_FILE, public)
    return homes


def new_identities(names: list[str]) -> dict[str, SigningIdentity]:
    """Fresh in-memory identities sharing one keyring (tests, benchmarks, `local_round`)."""
    keys = {name: Ed25519PrivateKey.generate() for name in names}
    keyring = {name: key.public_key() for name, key in keys.items()}
    return {name: SigningIdentity(name=name, private_key=key, keyring=keyring) for name, key in keys.items()}


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise IdentityError(f"{path}: not a readable PEM private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path}: expected an Ed25519 key, got {type(key).__name__}")
    return key


def read_keyring(path: Path) -> dict[str, Ed25519PublicKey]:
    """{name: public key} from a keyring file; raises IdentityError naming the file and entry."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())["ed25519"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise IdentityError(f"{path}: expected a JSON object with an 'ed25519' map of node names to keys ({err})") from err
    keyring = {}
    for name, hex_key in entries.items():
        try:
            keyring[str(name)] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
        except (ValueError, TypeError) as err:
            raise IdentityError(f"{path}: key of {name!r} is not 32 bytes of hex ({err})") from err
    return keyring


def load_identity(folder: Path, name: str) -> SigningIdentity:
    """The identity in `folder` (`secagg.key` + `federation-keys.json`) for node `name`.

    Raises IdentityError when a file is missing or malformed, the private key is readable by
    others, or the keyring does not hold `name` with this key's public half.
    """
    folder = Path(folder)
    key_file, ring_file = folder / KEY_FILE, folder / KEYRING_FILE
    for path in (key_file, ring_file):
        if not path.exists():
            raise IdentityError(f"{path} is missing: re-run `fedpriv provision` with the same output folder to add it")
    if key_file.stat().st_mode & 0o077:
        raise IdentityError(f"{key_file}: private key is readable by others; chmod 600 it")
    key, keyring = _read_private_key(key_file), read_keyring(ring_file)
    if name not in keyring or _public_hex(key) != keyring[name].public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex():
        raise IdentityError(f"{ring_file} does not list {name!r} with the public half of {key_file}")
    return SigningIdentity(name=name, private_key=key, keyring=keyring)
