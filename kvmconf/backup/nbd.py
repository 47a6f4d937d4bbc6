"""A small NBD client for the exports of a pull-mode backup job: extents, and reads kept in flight.

Only what reading a libvirt/QEMU backup export needs (the protocol is NBD's doc/proto.md): the fixed
newstyle handshake over a unix socket, structured replies, meta contexts (``base:allocation`` for
data/holes/zeros, ``qemu:dirty-bitmap:backup-<dev>`` for the blocks changed since a checkpoint),
NBD_CMD_BLOCK_STATUS, and NBD_CMD_READ with the "don't fragment" flag, so every read comes back as
one data chunk that lands directly in the caller's buffer (no copy in Python).

Reads are pipelined: several requests stay in flight, because one request at a time leaves the
server idle between replies (35-50% slower in the measurements of backup-notes.md §3.2).
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass

from kvmconf.errors import KvmconfError

_NBDMAGIC = 0x4E42444D41474943
_IHAVEOPT = 0x49484156454F5054
_REPLY_MAGIC_OPT = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_STRUCTURED_REPLY_MAGIC = 0x668E33EF

_FLAG_FIXED_NEWSTYLE = 1 << 0
_FLAG_NO_ZEROES = 1 << 1

_OPT_GO = 7
_OPT_STRUCTURED_REPLY = 8
_OPT_SET_META_CONTEXT = 10

_REP_ACK = 1
_REP_INFO = 3
_REP_META_CONTEXT = 4
_REP_ERROR_BIT = 1 << 31

_INFO_EXPORT = 0
_INFO_BLOCK_SIZE = 3

_TRANSMIT_SEND_DF = 1 << 7

_CMD_READ = 0
_CMD_DISC = 2
_CMD_BLOCK_STATUS = 7
_CMD_FLAG_DF = 1 << 2

_REPLY_FLAG_DONE = 1 << 0
_REPLY_TYPE_NONE = 0
_REPLY_TYPE_OFFSET_DATA = 1
_REPLY_TYPE_OFFSET_HOLE = 2
_REPLY_TYPE_BLOCK_STATUS = 5
_REPLY_TYPE_ERROR_BIT = 1 << 15

# base:allocation flag that matters here (HOLE, 1, does not: a hole without ZERO must be read anyway)
STATE_ZERO = 2
# qemu:dirty-bitmap:* flag
STATE_DIRTY = 1

_MAX_REQUEST = 32 * 1024 * 1024  # QEMU's NBD_MAX_BUFFER_SIZE; the server may say less
_STATUS_SPAN = 1 << 30  # one BLOCK_STATUS asks about at most this much (the length field is 32 bits)
# How long one send or receive may wait before the export counts as stalled. A healthy export answers a read
# of at most 32 MiB in well under a second; storage under the VM's disks that hangs (an NFS server rebooting,
# a dying disk retrying) may answer again after a minute or two. Five minutes let such storage come back, and
# keep a hung export from holding the job (and the guest's copy-before-write), the VM's lock and every later
# run forever.
TIMEOUT = 300.0

_REQUEST = struct.Struct(">IHHQQI")
_CHUNK_HEADER = struct.Struct(">IHHQI")


class NbdError(KvmconfError):
    """The export could not be read: the server refused, failed a request or went away (QEMU died)."""


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class NbdClient:
    """One connection to one export. Not thread-safe: one thread drives it."""

    def __init__(self, sock: socket.socket, export: str, size: int, max_request: int, contexts: dict[str, int]) -> None:
        self._sock = sock
        self.export = export
        self.size = size
        self.max_request = max_request
        self._contexts = contexts  # name -> the id the server gave it
        self._cookie = 0

    # --- handshake ------------------------------------------------------------------------------

    @classmethod
    def connect(cls, socket_path: str, export: str, contexts: Iterable[str] = ("base:allocation",),
                timeout: float = TIMEOUT) -> NbdClient:
        """`timeout`: seconds a send or receive may wait, for the whole life of the connection (see TIMEOUT)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
            return cls._handshake(sock, export, list(contexts))
        except TimeoutError:
            sock.close()
            raise _stalled(export, timeout) from None
        except OSError as err:
            sock.close()
            raise NbdError(f"cannot connect to the NBD export {export!r} at {socket_path}: {err.strerror or err}") \
                from None
        except BaseException:
            sock.close()
            raise

    @classmethod
    def _handshake(cls, sock: socket.socket, export: str, contexts: list[str]) -> NbdClient:
        magic, opt_magic, flags = struct.unpack(">QQH", _recv_exact(sock, 18))
        if magic != _NBDMAGIC or opt_magic != _IHAVEOPT or not flags & _FLAG_FIXED_NEWSTYLE:
            raise NbdError("the server does not speak fixed newstyle NBD")
        sock.sendall(struct.pack(">I", _FLAG_FIXED_NEWSTYLE | (flags & _FLAG_NO_ZEROES)))

        _option(sock, _OPT_STRUCTURED_REPLY, b"")
        _expect_ack(sock, _OPT_STRUCTURED_REPLY, "structured replies")

        name = export.encode()
        ids: dict[str, int] = {}
        if contexts:
            queries = b"".join(struct.pack(">I", len(c.encode())) + c.encode() for c in contexts)
            _option(sock, _OPT_SET_META_CONTEXT,
                    struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts)) + queries)
            while True:
                reply, data = _option_reply(sock, _OPT_SET_META_CONTEXT)
                if reply == _REP_META_CONTEXT:
                    ids[data[4:].decode()] = struct.unpack(">I", data[:4])[0]
                elif reply == _REP_ACK:
                    break
                else:
                    raise NbdError(f"meta contexts {contexts}: {_reply_error(reply, data)}")
            missing = [c for c in contexts if c not in ids]
            if missing:
                raise NbdError(f"export {export!r} has no meta context {', '.join(missing)}")

        _option(sock, _OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, _INFO_BLOCK_SIZE))
        size, transmit, max_request = -1, 0, _MAX_REQUEST
        while True:
            reply, data = _option_reply(sock, _OPT_GO)
            if reply == _REP_INFO:
                kind = struct.unpack(">H", data[:2])[0]
                if kind == _INFO_EXPORT:
                    size, transmit = struct.unpack(">QH", data[2:12])
                elif kind == _INFO_BLOCK_SIZE:
                    max_request = min(max_request, struct.unpack(">III", data[2:14])[2])
            elif reply == _REP_ACK:
                break
            else:
                raise NbdError(f"export {export!r}: {_reply_error(reply, data)}")
        if size < 0:
            raise NbdError(f"export {export!r}: the server did not say its size")
        if not transmit & _TRANSMIT_SEND_DF:
            raise NbdError(f"export {export!r}: the server cannot send unfragmented reads")
        return cls(sock, export, size, max_request, ids)

    # --- transmission ---------------------------------------------------------------------------

    def close(self) -> None:
        with suppress(OSError):  # the server is gone already: nothing to say goodbye to
            self._sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, 0, _CMD_DISC, self._next_cookie(), 0, 0))
        self._sock.close()

    def abort(self) -> None:
        """Make a send or receive that waits, and every later one, fail at once (an NbdError): the run is ending."""
        with suppress(OSError):  # closed or never connected: nothing waits on it
            self._sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _next_cookie(self) -> int:
        self._cookie += 1
        return self._cookie

    def _send(self, command: int, flags: int, offset: int, length: int) -> int:
        cookie = self._next_cookie()
        try:
            self._sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, flags, command, cookie, offset, length))
        except OSError as err:
            raise _gone(self.export, err, self._sock.gettimeout()) from None
        return cookie

    def _chunk_header(self) -> tuple[int, int, int, int]:
        """(flags, type, cookie, length) of the next structured reply chunk."""
        try:
            magic, flags, kind, cookie, length = _CHUNK_HEADER.unpack(_recv_exact(self._sock, _CHUNK_HEADER.size))
        except OSError as err:
            raise _gone(self.export, err, self._sock.gettimeout()) from None
        if magic != _STRUCTURED_REPLY_MAGIC:
            raise NbdError(f"export {self.export!r}: unexpected reply (magic {magic:#x})")
        return flags, kind, cookie, length

    def _payload(self, length: int) -> bytes:
        try:
            return _recv_exact(self._sock, length)
        except OSError as err:
            raise _gone(self.export, err, self._sock.gettimeout()) from None

    def extents(self, context: str, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The extents of `context` covering [offset, offset+length), neighbours with equal flags merged."""
        context_id = self._contexts[context]
        end = self.size if length is None else min(self.size, offset + length)
        pending: Extent | None = None
        while offset < end:
            cookie = self._send(_CMD_BLOCK_STATUS, 0, offset, min(end - offset, _STATUS_SPAN))
            done, covered = False, offset
            while not done:
                flags, kind, got, size = self._chunk_header()
                payload = self._payload(size)
                if got != cookie:
                    raise NbdError(f"export {self.export!r}: a reply for an unknown request")
                done = bool(flags & _REPLY_FLAG_DONE)
                if kind & _REPLY_TYPE_ERROR_BIT:
                    raise NbdError(f"export {self.export!r}: block status at {offset}: {_chunk_error(payload)}")
                if kind != _REPLY_TYPE_BLOCK_STATUS or struct.unpack(">I", payload[:4])[0] != context_id:
                    continue
                for i in range(4, len(payload), 8):
                    span, state = struct.unpack_from(">II", payload, i)
                    span = min(span, end - covered)
                    if span <= 0:
                        break
                    if pending is not None and pending.flags == state and pending.end == covered:
                        pending = Extent(pending.offset, pending.length + span, state)
                    else:
                        if pending is not None:
                            yield pending
                        pending = Extent(covered, span, state)
                    covered += span
            if covered == offset:
                raise NbdError(f"export {self.export!r}: block status made no progress at {offset}")
            offset = covered
        if pending is not None:
            yield pending

    def read_many(self, requests: Iterable[tuple[int, memoryview]], depth: int = 8) -> Iterator[tuple[int, memoryview]]:
        """Read each (offset, buffer) request fully into its buffer; yield them in the order given.

        Up to `depth` requests are in flight. A buffer is filled only after it was handed in and is
        yielded once complete: the caller may reuse it after that. Lengths above the server's maximum
        must be split by the caller (see max_request).
        """
        todo = iter(requests)
        in_flight: deque[tuple[int, int, memoryview]] = deque()
        done: dict[int, bool] = {}
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < depth:
                nxt = next(todo, None)
                if nxt is None:
                    exhausted = True
                    break
                offset, buffer = nxt
                if len(buffer) > self.max_request or offset + len(buffer) > self.size:
                    raise ValueError(f"read of {len(buffer)} bytes at {offset} exceeds the export's limits")
                cookie = self._send(_CMD_READ, _CMD_FLAG_DF, offset, len(buffer))
                in_flight.append((cookie, offset, buffer))
                done[cookie] = False
            if not in_flight:
                return
            head = in_flight[0][0]
            while not done[head]:
                self._receive_read(in_flight, done)
            cookie, offset, buffer = in_flight.popleft()
            del done[cookie]
            yield offset, buffer

    def _receive_read(self, in_flight: deque[tuple[int, int, memoryview]], done: dict[int, bool]) -> None:
        """Take one reply chunk off the wire, for any request in flight (the server may answer out of order)."""
        flags, kind, cookie, length = self._chunk_header()
        request = next((r for r in in_flight if r[0] == cookie), None)
        if request is None:
            raise NbdError(f"export {self.export!r}: a reply for an unknown request")
        _, offset, buffer = request
        if kind == _REPLY_TYPE_OFFSET_DATA:
            at = struct.unpack(">Q", self._payload(8))[0] - offset
            if at < 0 or at + length - 8 > len(buffer):
                raise NbdError(f"export {self.export!r}: read reply outside the request")
            try:
                _recv_into_exact(self._sock, buffer[at:at + length - 8])
            except OSError as err:
                raise _gone(self.export, err, self._sock.gettimeout()) from None
        elif kind == _REPLY_TYPE_OFFSET_HOLE:
            at, span = struct.unpack(">QI", self._payload(12))
            buffer[at - offset:at - offset + span] = bytes(span)
        elif kind & _REPLY_TYPE_ERROR_BIT:
            raise NbdError(f"export {self.export!r}: read at {offset}: {_chunk_error(self._payload(length))}")
        elif kind != _REPLY_TYPE_NONE:
            self._payload(length)  # a chunk type this client does not use: skip it
        if flags & _REPLY_FLAG_DONE:
            done[cookie] = True


# --- wire helpers ---------------------------------------------------------------------------------

def _recv_exact(sock: socket.socket, length: int) -> bytes:
    buffer = bytearray(length)
    _recv_into_exact(sock, memoryview(buffer))
    return bytes(buffer)


def _recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionResetError(0, "connection closed by the server")
        got += n


def _gone(export: str, err: OSError, timeout: float | None = None) -> NbdError:
    if isinstance(err, TimeoutError):
        return _stalled(export, timeout)
    return NbdError(f"export {export!r}: the NBD server went away ({err.strerror or err})")


def _stalled(export: str, timeout: float | None) -> NbdError:
    waited = "" if timeout is None else f" in {timeout:g} s"
    return NbdError(f"export {export!r}: the NBD server did not answer{waited} (the VM's storage may hang)")


def _option(sock: socket.socket, option: int, data: bytes) -> None:
    sock.sendall(struct.pack(">QII", _IHAVEOPT, option, len(data)) + data)


def _option_reply(sock: socket.socket, option: int) -> tuple[int, bytes]:
    magic, got, reply, length = struct.unpack(">QIII", _recv_exact(sock, 20))
    if magic != _REPLY_MAGIC_OPT or got != option:
        raise NbdError(f"unexpected option reply (magic {magic:#x}, option {got})")
    return reply, _recv_exact(sock, length)


def _expect_ack(sock: socket.socket, option: int, what: str) -> None:
    reply, data = _option_reply(sock, option)
    if reply != _REP_ACK:
        raise NbdError(f"the server refused {what}: {_reply_error(reply, data)}")


def _reply_error(reply: int, data: bytes) -> str:
    text = data.decode(errors="replace")
    if reply & _REP_ERROR_BIT:
        return f"error {reply & ~_REP_ERROR_BIT}" + (f": {text}" if text else "")
    return f"unexpected reply type {reply}"


def _chunk_error(payload: bytes) -> str:
    errno_value, length = struct.unpack(">IH", payload[:6])
    message = payload[6:6 + length].decode(errors="replace")
    return f"errno {errno_value}" + (f": {message}" if message else "")
