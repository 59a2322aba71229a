"""TLS on every port (`--tls-cert` / `--tls-key`): a self-signed certificate for 127.0.0.1,
and clients that verify it: tritonclient over HTTP and gRPC, TensorFlow Serving's stub,
urllib on /metrics. Plain HTTP and plain gRPC on those ports fail, as does a client that
does not trust the certificate; front-end processes (``--http-workers``) serve TLS too; a
missing or mismatched key stops the server at start with a message."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

import grpc
from test_serve import Server, ready_server
from test_triton import SIMPLE, A, B, simple_inputs

pytestmark = pytest.mark.module_pool

CONFIG = textwrap.dedent("""
    [server]
    grpc_port = 0
    tf_serving_port = 0
    metrics_port = 0
    tls_cert = "cert.pem"
    tls_key = "key.pem"
    """) + SIMPLE


def write_certificate(directory, name: str = "") -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workerpool test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"cert{name}.pem", directory / f"key{name}.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def start(directory, *args) -> Server:
    cert, _ = write_certificate(directory)
    (directory / "serve.toml").write_text(CONFIG)
    server = ready_server(["--config", str(directory / "serve.toml"), *args], grpc_lines=2,
                          metrics_line=True, cafile=cert)
    server.cert = cert
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("tls"))
    yield server
    assert server.stop() == 0, server.stderr()


def https_client(server, **options):
    return triton_http.InferenceServerClient(server.address, ssl=True, **options)


def test_tritonclient_http_verifies_and_infers(server):
    assert server.url.startswith("https://")
    client = https_client(server, ssl_options={"ca_certs": server.cert})
    try:
        result = client.infer("simple", simple_inputs(triton_http))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    finally:
        client.close()


def test_tritonclient_grpc_verifies_and_infers(server):
    client = triton_grpc.InferenceServerClient(server.grpc["KServe v2"], ssl=True,
                                               root_certificates=server.cert)
    try:
        result = client.infer("simple", simple_inputs(triton_grpc))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
    finally:
        client.close()


def test_tf_serving_stub_over_tls(server):
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    def tensor(values: np.ndarray):
        shape = tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in values.shape])
        return tensor_pb2.TensorProto(dtype=types_pb2.DT_INT32, tensor_shape=shape,
                                      int_val=values.reshape(-1).tolist())

    with open(server.cert, "rb") as cert:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read())
    with grpc.secure_channel(server.grpc["TensorFlow Serving"], credentials) as channel:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "simple"
        request.inputs["INPUT0"].CopyFrom(tensor(A))
        request.inputs["INPUT1"].CopyFrom(tensor(B))
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=30)
    answer = response.outputs["OUTPUT0"]
    values = np.frombuffer(answer.tensor_content, np.int32) if answer.tensor_content \
        else np.array(answer.int_val, np.int32)
    assert values.tolist() == (A + B).reshape(-1).tolist()


def test_metrics_port_is_tls_too(server):
    assert server.metrics_url.startswith("https://")
    context = ssl.create_default_context(cafile=server.cert)
    with urllib.request.urlopen(server.metrics_url, timeout=30, context=context) as answer:
        assert b"workerpool_" in answer.read()


def test_plain_and_unverified_clients_fail(server):
    plain_url = server.url.replace("https://", "http://") + "/v2/health/ready"
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(plain_url, timeout=10).read()
    plain = triton_grpc.InferenceServerClient(server.grpc["KServe v2"])
    try:
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=10)
    finally:
        plain.close()
    stranger = https_client(server)  # the system's authorities: ours is not one of them
    try:
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            stranger.is_server_live()
    finally:
        stranger.close()
    doubtful = triton_grpc.InferenceServerClient(server.grpc["KServe v2"], ssl=True)
    try:
        with pytest.raises(InferenceServerException):
            doubtful.is_server_live(client_timeout=10)
    finally:
        doubtful.close()
    # and the server is none the worse for them
    assert server.get("/v2/health/ready")[0] == 200


def test_front_end_processes_serve_tls(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("tls_fronts"), "--http-workers", "2")
    try:
        client = https_client(server, ssl_options={"ca_certs": server.cert})
        try:
            for _ in range(4):
                result = client.infer("simple", simple_inputs(triton_http))
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
        finally:
            client.close()
    finally:
        assert server.stop() == 0, server.stderr()


@pytest.mark.parametrize("case", ["no key", "wrong key", "missing file"])
def test_a_bad_certificate_setting_stops_the_server_at_start(tmp_path, case):
    cert, key = write_certificate(tmp_path)
    _, other_key = write_certificate(tmp_path, "2")
    args = {"no key": ["--tls-cert", cert],
            "wrong key": ["--tls-cert", cert, "--tls-key", other_key],
            "missing file": ["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", key]}[case]
    done = subprocess.run([sys.executable, "-m", "workerpool", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    expected = {"no key": "needs both tls_cert and tls_key",
                "wrong key": "cannot use tls_cert", "missing file": "cannot use tls_cert"}
    assert expected[case] in done.stderr, done.stderr
