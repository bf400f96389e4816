"""`fedpriv provision`: CA, server certificate and node keys, and the node-side config rules."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.config import node_identity
from privacy.provisioning import ProvisioningError, load_kit, provision
from server.fleet_gateway import FLEET_ROUTES, nginx_config
from shared_models.run_config import ConfigError, TrainingPlan


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_kits_hold_a_ca_a_server_certificate_for_the_hosts_and_one_p384_openssh_key_per_node(tmp_path):
    fed = provision(tmp_path, ["fl.hospital.org", "10.0.0.5"], ["hospital-a", "hospital-b"], port=9443)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((fed.server_kit / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The node-facing certificate names the asked hosts only; the SuperLink's loopback port has its own.
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.hospital.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.0.0.5")}
    loopback = x509.load_pem_x509_certificate((fed.server_kit / "loopback.crt").read_bytes())
    loopback.verify_directly_issued_by(ca)
    loop_san = loopback.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert loop_san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert loop_san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert _mode(fed.server_kit / "loopback.key") == 0o600
    kit = load_kit(fed.server_kit, "server")
    assert kit["loopback_certificate"] == (fed.server_kit / "loopback.crt").resolve()
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"
    for secret in (tmp_path / "ca" / "ca.key", fed.server_kit / "server.key"):
        assert _mode(secret) == 0o600
    for node in ("hospital-a", "hospital-b"):
        kit = fed.node_kits[node]
        assert _mode(kit) == 0o700  # the site's private keys: its service account only
        key_file = kit / f"{node}.key"
        assert _mode(key_file) == 0o600
        assert key_file.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        key = serialization.load_ssh_private_key(key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        public = serialization.load_ssh_public_key((fed.server_kit / "node-keys" / f"{node}.pub").read_bytes())
        assert public.public_numbers() == key.public_key().public_numbers()
        assert (kit / "ca.crt").read_bytes() == (tmp_path / "ca" / "ca.crt").read_bytes()
        meta = load_kit(kit, "node")
        assert meta["superlink"] == "fl.hospital.org:9443" and meta["node"] == node
    assert load_kit(fed.server_kit, "server")["nodes"] == ["hospital-a", "hospital-b"]


def test_rerunning_keeps_every_key_and_adds_new_nodes(tmp_path):
    provision(tmp_path, ["fl.example.org"], ["a"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.key")}
    fed = provision(tmp_path, ["fl.example.org"], ["a", "b"])
    for path, content in before.items():
        assert path.read_bytes() == content
    assert (fed.node_kits["b"] / "b.key").exists()
    assert load_kit(fed.server_kit, "server")["nodes"] == ["a", "b"]
    with pytest.raises(ProvisioningError, match="server.crt is for"):
        provision(tmp_path, ["other.example.org"], ["a"])


def test_every_node_kit_holds_its_secagg_signing_key_and_the_whole_federations_keyring(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privacy.secagg.identity import IdentityError, load_identity

    provision(tmp_path, ["fl.example.org"], ["a", "b"])
    fed = provision(tmp_path, ["fl.example.org"], ["c"])  # a node added later
    for name in ("a", "b", "c"):
        kit = tmp_path / "nodes" / name
        assert stat.S_IMODE((kit / "secagg.key").stat().st_mode) == 0o600
        identity = load_identity(kit, name)
        assert sorted(identity.keyring) == ["a", "b", "c"]  # older kits learn the new node
        key = serialization.load_pem_private_key((kit / "secagg.key").read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        assert identity.verifies(name, b"m", key.sign(b"m")) and not identity.verifies(name, b"m", b"\0" * 64)
    with pytest.raises(IdentityError, match="does not list 'b' with the public half"):
        load_identity(fed.node_kits["c"], "b")  # c's key is not b's


@pytest.mark.parametrize("hosts, nodes, message", [
    ([], ["a"], "--server-host needs"),
    (["fl example"], ["a"], "is not a host name"),
    (["fl.example.org"], [], "--nodes needs"),
    (["fl.example.org"], ["a/b"], "letters, digits"),
    (["fl.example.org"], ["a", "a"], "duplicates"),
])
def test_bad_provisioning_input_is_named(tmp_path, hosts, nodes, message):
    with pytest.raises(ProvisioningError, match=message):
        provision(tmp_path, hosts, nodes)
    assert not (tmp_path / "ca").exists()  # nothing half-written


def test_a_kit_with_a_readable_private_key_or_of_the_wrong_role_is_refused(tmp_path):
    fed = provision(tmp_path, ["fl.example.org"], ["a"])
    with pytest.raises(ProvisioningError, match="'server' kit, this command needs the 'node' kit"):
        load_kit(fed.server_kit, "node")
    (fed.node_kits["a"] / "a.key").chmod(0o644)
    with pytest.raises(ProvisioningError, match="readable by others"):
        load_kit(fed.node_kits["a"], "node")
    with pytest.raises(ProvisioningError, match="kit.json not found"):
        load_kit(tmp_path / "nowhere", "node")


def test_the_gateway_forwards_only_the_fleet_api(tmp_path):
    text = nginx_config(listen_host="0.0.0.0", listen_port=9092, upstream_port=9093, certificate=tmp_path / "s.crt",
                        private_key=tmp_path / "s.key", ca_certificate=tmp_path / "ca.crt", workdir=tmp_path)
    locations = [line.strip() for line in text.splitlines() if line.strip().startswith("location")]
    assert locations == [f"location = {route} {{" for route in FLEET_ROUTES] + ["location / {"]
    assert text.count("proxy_pass") == 12 and "proxy_pass https://127.0.0.1:9093/v1/fleet/pull-messages;" in text
    assert text.count("limit_except POST { deny all; }") == 12
    assert "return 403" in text and "listen 0.0.0.0:9092 ssl;" in text and "proxy_ssl_verify on;" in text


class _Context:
    def __init__(self, node_config, run_config):
        self.node_config, self.run_config = node_config, run_config


def _plan(**overrides):
    cfg = {"task": "text", "dataset": "sms_spam", "model": "", "num-server-rounds": 2, "local-epochs": 1,
           "batch-size": 32, "lr": 8.0, "optimizer": "sgd", "dp": True, "epsilon": 8.0, "delta": 1e-5,
           "max-grad-norm": 1.0, "val-fraction": 0.1, "partition": "iid", "alpha": 0.5, "seed": 0, "run-name": "t",
           **overrides}
    return cfg, TrainingPlan.from_run_config(cfg)


def test_a_deployed_nodes_ledger_folder_and_budget_are_its_owners_not_the_coordinators(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRIV_STATE_DIR", str(tmp_path / "owner-default"))
    run_cfg, plan = _plan(**{"state-dir": str(tmp_path / "coordinator-chosen"), "max-epsilon": 100.0})
    node = node_identity(_Context({"data-path": "/data/x.csv", "node-name": "h1"}, run_cfg), plan)
    # A coordinator must not be able to point a node at a fresh ledger or raise its budget.
    assert node.state_dir == tmp_path / "owner-default" and node.max_epsilon == 8.0
    node = node_identity(_Context({"data-path": "/data/x.csv", "node-name": "h1", "state-dir": str(tmp_path / "own"),
                                   "max-epsilon": 3.0}, run_cfg), plan)
    assert node.state_dir == tmp_path / "own" and node.max_epsilon == 3.0
    # Simulated nodes still take the run's folder and budget (the researcher plays every owner).
    sim = node_identity(_Context({"partition-id": 0, "num-partitions": 2}, run_cfg), plan)
    assert sim.state_dir == tmp_path / "coordinator-chosen" and sim.max_epsilon == 100.0


def test_a_node_refuses_a_run_for_another_task():
    run_cfg, plan = _plan(task="vision")
    with pytest.raises(ConfigError, match="holds text data .* trains a vision model"):
        node_identity(_Context({"data-path": "/data/x.csv", "task": "text"}, run_cfg), plan)


def test_fedpriv_node_names_bad_local_data_and_a_delta_too_large_before_connecting(tmp_path, capsys):
    from simulations.cli import main

    kit = provision(tmp_path / "fed", ["127.0.0.1"], ["h1"]).node_kits["h1"]
    bad = tmp_path / "notes.csv"
    bad.write_text("text,label\nhello,ham\n,spam\n")
    assert main(["node", "--kit", str(kit), "--data", str(bad), "--task", "text"]) == 2
    assert f"{bad}: line 3 has an empty 'text' or 'label'" in capsys.readouterr().out
    small = tmp_path / "small.csv"
    small.write_text("text,label\nhello,ham\nwin cash now,spam\n")
    assert main(["node", "--kit", str(kit), "--data", str(small), "--task", "text", "--delta", "0.6"]) == 2
    assert "--delta 0.6 must be < 1/records = 0.5" in capsys.readouterr().out
    assert main(["node", "--kit", str(tmp_path / "fed" / "server"), "--data", str(small), "--task", "text"]) == 2
    assert "'server' kit, this command needs the 'node' kit" in capsys.readouterr().out
    # A site that asks for patient-level DP does not start on data without group keys (issue 19).
    assert main(["node", "--kit", str(kit), "--data", str(small), "--task", "text", "--delta", "0.1",
                 "--privacy-unit", "patient"]) == 2
    assert "privacy unit is 'patient' but its data has no group keys" in capsys.readouterr().out


def test_loopback_names_enter_the_node_facing_certificate_only_when_asked(tmp_path):
    from simulations.cli import main

    assert main(["provision", "--out", str(tmp_path / "asked"), "--server-host", "fl.example.org", "--nodes", "a",
                 "--loopback-sans"]) == 0
    server = x509.load_pem_x509_certificate((tmp_path / "asked" / "server" / "server.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    # Re-running without the flag does not silently re-issue it either way.
    with pytest.raises(ProvisioningError, match="server.crt is for"):
        provision(tmp_path / "asked", ["fl.example.org", "other.example.org"], ["a"])


def test_a_kit_from_before_loopback_certificates_keeps_its_server_certificate(tmp_path):
    from privacy import provisioning

    fed = provision(tmp_path, ["fl.example.org"], ["a"], loopback_sans=True)  # what older kits hold
    (fed.server_kit / "loopback.crt").unlink()
    (fed.server_kit / "loopback.key").unlink()
    before = (fed.server_kit / "server.crt").read_bytes()
    provisioning.provision(tmp_path, ["fl.example.org"], ["a", "b"])
    assert (fed.server_kit / "server.crt").read_bytes() == before and (fed.server_kit / "loopback.crt").exists()
