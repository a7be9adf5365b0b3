"""The contract suites cover every registered family, and the suite is hermetic.

The encoder and decoder contract tests (test_encoders.py, test_decoders.py, test_decoding.py,
test_model.py) are parametrised over the registry; a family registered without a tiny config in
tests/conftest.py fails here (and in each of its contract cases) rather than being skipped.
"""

from __future__ import annotations

import socket

import pytest

import test_decoders
import test_decoding
import test_encoders
import test_model
from conftest import TINY_DECODERS, TINY_ENCODERS, NetworkAccessError, is_local_host
from seesay.registry import list_decoders, list_encoders


def test_every_registered_encoder_has_a_tiny_config():
    assert sorted(TINY_ENCODERS) == list_encoders()


def test_every_registered_decoder_has_a_tiny_config():
    assert sorted(TINY_DECODERS) == list_decoders()


def test_contract_suites_are_parametrised_over_the_registry():
    assert test_encoders.ENCODERS == list_encoders()
    for suite in (test_decoders, test_decoding, test_model):
        assert suite.DECODERS == list_decoders(), suite.__name__
    assert "titans_mac" in list_decoders()  # the family that used to escape the decoder suites


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1", "localhost", "0.0.0.0", ""])
def test_loopback_hosts_are_allowed(host):
    assert is_local_host(host)


@pytest.mark.parametrize("host", ["192.0.2.1", "8.8.8.8", "2001:db8::1", "::ffff:192.0.2.1", "download.pytorch.org"])
def test_other_hosts_are_not(host):
    assert not is_local_host(host)


def test_network_beyond_loopback_fails_the_test(_no_network):
    with pytest.raises(NetworkAccessError, match="192.0.2.1"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    with pytest.raises(NetworkAccessError, match="DNS look-up of 'download.pytorch.org'"):
        socket.getaddrinfo("download.pytorch.org", 443)
    with socket.socket(socket.AF_INET6) as s, pytest.raises(NetworkAccessError):
        s.connect_ex(("2001:db8::1", 80))
    assert len(_no_network) == 3  # also recorded: code that swallows the error still fails its test
    _no_network.clear()  # (this test expected them)


def test_loopback_connections_work():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("localhost", port), timeout=5):
            conn, _ = server.accept()
            conn.close()
