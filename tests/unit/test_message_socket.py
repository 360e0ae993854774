"""The driver <-> rank 0 socket: framed round trips, token check before any unpickling, closed peers."""

from __future__ import annotations

import pickle
import socket
import threading

import pytest

from cluster.parallel.message_socket import ChannelClosed, MessageListener, MessageSocket


def _connect_later(port: int, token: str, out: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: out.append(MessageSocket.connect("127.0.0.1", port, token, 5)))
    thread.start()
    return thread


def test_round_trip_of_small_and_large_messages():
    listener = MessageListener("127.0.0.1")
    peer: list = []
    thread = _connect_later(listener.port, "t" * 32, peer)
    driver = listener.accept("t" * 32, 5)
    thread.join()
    big = list(range(200_000))
    for message in (("step", {"a": 1}), ("rpc", "score", big)):
        driver.send(message)
        assert peer[0].recv() == message
        peer[0].send(("ok", message))
        assert driver.recv() == ("ok", message)
    peer[0].close()
    assert driver.readable(5)
    with pytest.raises(ChannelClosed):
        driver.recv()
    listener.close()


def test_a_connection_without_the_token_is_dropped_unread():
    listener = MessageListener("127.0.0.1")
    intruder = socket.create_connection(("127.0.0.1", listener.port))
    intruder.sendall(b"x" * 32 + pickle.dumps("payload"))
    peer: list = []
    thread = _connect_later(listener.port, "k" * 32, peer)
    driver = listener.accept("k" * 32, 5)
    thread.join()
    peer[0].send("hello")
    assert driver.recv() == "hello"
    try:  # closed by the listener: an orderly close, or a reset since its bytes were left unread
        assert intruder.recv(1) == b""
    except ConnectionResetError:
        pass
    listener.close()


def test_accept_times_out():
    listener = MessageListener("127.0.0.1")
    with pytest.raises(OSError):
        listener.accept("k" * 32, 0.2)
    listener.close()
