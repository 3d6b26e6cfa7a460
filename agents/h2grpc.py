"""One unary gRPC call over HTTP/2 cleartext on a unix socket, without grpcio.

Why: importing grpcio costs the agent about 18 MB of RSS (its core library and threads), which
alone would take the agent past its 40 MB budget; all the agent ever needs from gRPC is one unary
call (`/v1.PodResourcesLister/List`) every few seconds. HTTP/2 framing for that is small:

- client preface, our SETTINGS (push off, a 2 GiB stream window so the server never waits for
  WINDOW_UPDATEs) and a connection WINDOW_UPDATE to match;
- one HEADERS frame whose HPACK block uses only static-table indices and literals (no dynamic table,
  no Huffman), then one DATA frame with the length-prefixed protobuf request and END_STREAM;
- read frames until the stream ends: answer SETTINGS and PING, collect DATA, skip the response
  header blocks (decoding them would need HPACK's Huffman code; a call that ends without a message,
  as a gRPC error does, is reported as an error instead).

The checked-in grpcio stubs (api_pb2_grpc) remain for tests and as `--pod-resources-client grpcio`.
"""
from __future__ import annotations

import socket
import struct
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9
FLAG_END_STREAM, FLAG_ACK, FLAG_END_HEADERS, FLAG_PADDED = 0x1, 0x1, 0x4, 0x8
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
STREAM_ID = 1
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class GrpcCallError(RuntimeError):
    """The call failed: connection, protocol, or the server answered without a message."""


def _frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((frame_type, flags)) + struct.pack(">I", stream_id) + payload


def _hpack_int(value: int, prefix_bits: int, first_byte_flags: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first_byte_flags | value,))
    out = bytearray((first_byte_flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(text: str) -> bytes:
    raw = text.encode("ascii")
    return _hpack_int(len(raw), 7, 0x00) + raw  # H bit 0: no Huffman


def _literal_indexed_name(static_index: int, value: str) -> bytes:
    """Literal header field without indexing, name from the static table (RFC 7541 6.2.2)."""
    return _hpack_int(static_index, 4, 0x00) + _hpack_string(value)


def _literal_new_name(name: str, value: str) -> bytes:
    return b"\x00" + _hpack_string(name) + _hpack_string(value)


def request_headers(path: str, authority: str = "localhost") -> bytes:
    return b"".join((
        b"\x83",  # :method POST (static index 3)
        b"\x86",  # :scheme http (static index 6)
        _literal_indexed_name(4, path),  # :path
        _literal_indexed_name(1, authority),  # :authority
        _literal_indexed_name(31, "application/grpc"),  # content-type
        _literal_new_name("te", "trailers"),
        _literal_new_name("user-agent", "digital-worker-agent"),
    ))


def _recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GrpcCallError("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise GrpcCallError("connection closed by the server")
        chunks += chunk
    return bytes(chunks)


def unary_call(socket_path: str, method_path: str, request: bytes, timeout: float = 5.0) -> bytes:
    """Call `method_path` (e.g. "/v1.PodResourcesLister/List") with a serialized request message;
    return the serialized response message."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            raise GrpcCallError(f"cannot connect to {socket_path}: {exc}") from exc
        settings = struct.pack(">HI", SETTINGS_ENABLE_PUSH, 0) + struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)
        message = b"\x00" + struct.pack(">I", len(request)) + request  # uncompressed, length-prefixed
        sock.sendall(PREFACE
                     + _frame(SETTINGS, 0, 0, settings)
                     + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW))
                     + _frame(HEADERS, FLAG_END_HEADERS, STREAM_ID, request_headers(method_path))
                     + _frame(DATA, FLAG_END_STREAM, STREAM_ID, message))
        body = bytearray()
        while True:
            header = _recv_exactly(sock, 9, deadline)
            length = int.from_bytes(header[:3], "big")
            frame_type, flags = header[3], header[4]
            stream_id = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
            payload = _recv_exactly(sock, length, deadline) if length else b""
            if frame_type == SETTINGS and not flags & FLAG_ACK:
                sock.sendall(_frame(SETTINGS, FLAG_ACK, 0))
            elif frame_type == PING and not flags & FLAG_ACK:
                sock.sendall(_frame(PING, FLAG_ACK, 0, payload))
            elif frame_type == GOAWAY:
                last_stream = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                if last_stream < STREAM_ID:
                    raise GrpcCallError(f"server refused the call (GOAWAY, error {payload[4:8].hex()})")
            elif stream_id == STREAM_ID:
                if frame_type == RST_STREAM:
                    raise GrpcCallError(f"stream reset by the server (error {int.from_bytes(payload, 'big')})")
                if frame_type == DATA:
                    if flags & FLAG_PADDED and payload:
                        payload = payload[1:len(payload) - payload[0]]
                    body += payload
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise GrpcCallError("response too large")
                if frame_type in (DATA, HEADERS, CONTINUATION) and flags & FLAG_END_STREAM:
                    break
        if len(body) < 5:
            raise GrpcCallError(f"{method_path} ended without a response message (a gRPC error status)")
        compressed, size = body[0], int.from_bytes(body[1:5], "big")
        if compressed:
            raise GrpcCallError("compressed response (not requested)")
        if len(body) < 5 + size:
            raise GrpcCallError("truncated response message")
        return bytes(body[5:5 + size])
    except OSError as exc:
        raise GrpcCallError(f"{method_path} on {socket_path}: {exc}") from exc
    finally:
        sock.close()
