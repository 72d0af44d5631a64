# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, embedsignature=True, auto_pickle=False
"""Cython twin of fastproxy.codec.pure: the same codecs, the same output bytes, less work.

The pure codecs build a dict per Message and hand it to orjson. Here the payload is written
straight into one C buffer, which also leaves room in front for the WebSocket header, so the
frame and the payload are two copies of one buffer. Ticker values are kept as ready-made JSON
fragments (quoted, escaped) that change only when the exchange sends a new value, so a ticker
delta costs a few dict lookups, one fragment per changed field and some memcpy.

Strings are written by hand only when they are pure ASCII with nothing to escape (every
exchange number); anything else goes through orjson.dumps, so escaping can never differ from
the pure implementation. The error type, the key tables and the UTF-8 rule come from
fastproxy.codec.tables, shared with the pure codecs; the snapshot rewrite from fastproxy.wire.
Message is a cdef twin of fastproxy.wire.Message (a Python class call per Message cost about a
fifth of a ticker delta). tests/test_codec_diff.py compares the two implementations byte for
byte.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Next
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

import orjson

from fastproxy.codec.tables import (
    KLINE_CONFIRMED,
    KLINE_TIMES,
    KLINE_VALUES,
    TICKER_ASK_PRICE,
    TICKER_ASK_SIZE,
    TICKER_BID_PRICE,
    TICKER_BID_SIZE,
    TICKER_FIELDS,
    TICKER_NSLOTS,
    TICKER_PCT,
    TICKER_SLOT,
    TRADE_BLOCK,
    TRADE_ID,
    TRADE_SIDE,
    TRADE_SIDES,
    TRADE_SYMBOL,
    TRADE_TIME,
    TRADE_VALUES,
    CodecError,
    check_utf8,
)
from fastproxy.codec.tables import (
    LIQUIDATION_SIDES,
    PRICE_FRACTION,
    PRICE_INT_DIGITS,
    RESYNC_BACKWARD,
    RESYNC_CROSSED,
    RESYNC_GAP,
    RESYNC_MALFORMED,
    RESYNC_OVERFLOW,
    RESYNC_REPEAT,
    RESYNC_RESTART,
    RESYNC_SNAPSHOT,
)
from fastproxy.streams import KLINE, LIQUIDATION, ORDERBOOK, TICKER, TRADE
from fastproxy.wire import as_snapshot, envelope_prefix, new_epoch


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    bint PyUnicode_CheckExact(object o)
    bint PyDict_CheckExact(object o)
    bint PyList_CheckExact(object o)
    bint PyLong_CheckExact(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1
    Py_ssize_t PyList_GET_SIZE(object o)
    PyObject* PyList_GET_ITEM(object o, Py_ssize_t i)
    PyObject* PyDict_GetItemWithError(object d, object k) except? NULL
    # borrowed-pointer twins of the bytes macros: no refcount traffic in the assembly loops
    char* ptr_bytes_data "PyBytes_AS_STRING" (PyObject* o)
    Py_ssize_t ptr_bytes_len "PyBytes_GET_SIZE" (PyObject* o)
    void Py_INCREF(PyObject* o)
    void Py_DECREF(PyObject* o)


cdef object _dumps = orjson.dumps
cdef str SNAPSHOT = "snapshot"
cdef str UPDATE = "update"

# -- the output buffer --------------------------------------------------------------------------
# Lives on the C stack of one feed() call, so codecs hold no buffer memory between frames and
# nothing is shared between calls. Big trade batches spill to the heap.

cdef enum:
    LOCAL_CAP = 4096
    HEAD = 10  # room for the longest WebSocket header (1 + 1 + 8 bytes)

cdef struct Buf:
    char* p
    Py_ssize_t n
    Py_ssize_t cap
    char local[4096]


cdef inline void buf_init(Buf* b) noexcept:
    b.p = b.local
    b.n = HEAD
    b.cap = LOCAL_CAP


cdef inline void buf_free(Buf* b) noexcept:
    if b.p != b.local:
        free(b.p)
        b.p = b.local


cdef int buf_grow(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = b.cap * 2
    cdef char* q
    if cap < b.n + extra:
        cap = b.n + extra
    if b.p == b.local:
        q = <char*>malloc(cap)
        if q != NULL:
            memcpy(q, b.local, b.n)
    else:
        q = <char*>realloc(b.p, cap)
    if q == NULL:
        raise MemoryError()
    b.p = q
    b.cap = cap
    return 0


cdef inline int buf_put(Buf* b, const char* s, Py_ssize_t k) except -1:
    if b.n + k > b.cap:
        buf_grow(b, k)
    memcpy(b.p + b.n, s, k)
    b.n += k
    return 0


cdef inline int buf_bytes(Buf* b, bytes x) except -1:
    return buf_put(b, PyBytes_AS_STRING(x), PyBytes_GET_SIZE(x))


cdef char DIGITS2[201]
for _i in range(100):
    DIGITS2[2 * _i] = 48 + _i // 10
    DIGITS2[2 * _i + 1] = 48 + _i % 10


cdef int buf_int(Buf* b, int64_t v) except -1:
    # Two digits per division: exchange times have 13 digits and every Message carries one.
    cdef char tmp[24]
    cdef int i = 24
    cdef uint64_t u, r
    if v < 0:
        u = <uint64_t>(-(v + 1)) + 1
    else:
        u = <uint64_t>v
    while u >= 100:
        r = u % 100
        u //= 100
        i -= 2
        tmp[i] = DIGITS2[2 * r]
        tmp[i + 1] = DIGITS2[2 * r + 1]
    if u >= 10:
        i -= 2
        tmp[i] = DIGITS2[2 * u]
        tmp[i + 1] = DIGITS2[2 * u + 1]
    else:
        i -= 1
        tmp[i] = <char>(48 + u)
    if v < 0:
        i -= 1
        tmp[i] = 45  # '-'
    return buf_put(b, tmp + i, 24 - i)


cdef inline bint plain_ascii(const unsigned char* s, Py_ssize_t n) noexcept:
    # True when the JSON string needs no escape: no control character, quote or backslash.
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = s[i]
        if c < 0x20 or c == 0x22 or c == 0x5C:
            return False
    return True


cdef int buf_str(Buf* b, object s) except -1:
    """Append the exact str `s` as a JSON string, byte-identical to orjson."""
    cdef Py_ssize_t n
    cdef const unsigned char* d
    if PyUnicode_IS_ASCII(s):
        n = PyUnicode_GET_LENGTH(s)
        d = <const unsigned char*>PyUnicode_DATA(s)
        if plain_ascii(d, n):
            if b.n + n + 2 > b.cap:
                buf_grow(b, n + 2)
            b.p[b.n] = 0x22
            memcpy(b.p + b.n + 1, d, n)
            b.p[b.n + n + 1] = 0x22
            b.n += n + 2
            return 0
    return buf_bytes(b, _dumps(s))


cdef bytes str_frag(object s, bytes key):
    """`key` followed by the exact str `s` as a JSON string: one ready-to-copy fragment."""
    cdef Py_ssize_t n, k = PyBytes_GET_SIZE(key)
    cdef const unsigned char* d
    cdef bytes out
    cdef char* p
    if PyUnicode_IS_ASCII(s):
        n = PyUnicode_GET_LENGTH(s)
        d = <const unsigned char*>PyUnicode_DATA(s)
        if plain_ascii(d, n):
            out = PyBytes_FromStringAndSize(NULL, k + n + 2)
            p = PyBytes_AS_STRING(out)
            memcpy(p, PyBytes_AS_STRING(key), k)
            p[k] = 0x22
            memcpy(p + k + 1, d, n)
            p[k + n + 1] = 0x22
            return out
    return key + _dumps(s)


cdef Message buf_message(Buf* b, str stream_id, int64_t seq, str mtype, object ts, str epoch):
    """Finish the payload in `b` into a Message: header written in front, two copies out."""
    cdef Py_ssize_t plen = b.n - HEAD
    cdef Py_ssize_t h
    cdef unsigned char* p
    cdef int i
    cdef Message m
    if plen < 126:
        h = 2
        p = <unsigned char*>(b.p + HEAD - h)
        p[1] = <unsigned char>plen
    elif plen < 0x10000:
        h = 4
        p = <unsigned char*>(b.p + HEAD - h)
        p[1] = 126
        p[2] = <unsigned char>(plen >> 8)
        p[3] = <unsigned char>(plen & 0xFF)
    else:
        h = 10
        p = <unsigned char*>(b.p + HEAD - h)
        p[1] = 127
        for i in range(8):
            p[2 + i] = <unsigned char>((<uint64_t>plen >> (56 - 8 * i)) & 0xFF)
    p[0] = 0x81
    m = Message.__new__(Message)  # skips __init__: the fields are set right here
    m.stream_id = stream_id
    m.seq = seq
    m.type = mtype
    m.ts = ts
    m.epoch = epoch
    m.frame = PyBytes_FromStringAndSize(<char*>p, plen + h)
    m.payload = PyBytes_FromStringAndSize(b.p + HEAD, plen)
    return m


@cython.final
@cython.freelist(256)
cdef class Message:
    """One update of one stream, serialized once (see fastproxy.wire). The fields are
    read-only; `frame` is the complete unmasked WebSocket text frame around `payload`."""

    cdef readonly str stream_id
    cdef readonly int64_t seq
    cdef readonly str type
    cdef readonly object ts
    cdef readonly bytes payload
    cdef readonly bytes frame
    cdef readonly str epoch

    def __init__(
        self, str stream_id, int64_t seq, str type, ts, bytes payload, frame=None, str epoch=""
    ):
        self.stream_id = stream_id
        self.seq = seq
        self.type = type
        self.ts = ts
        self.payload = payload
        self.frame = ws_text_frame(payload) if frame is None else frame
        self.epoch = epoch

    def __eq__(self, other):
        if not isinstance(other, Message):
            return NotImplemented
        cdef Message o = <Message>other
        return (
            self.seq == o.seq
            and self.stream_id == o.stream_id
            and self.type == o.type
            and self.ts == o.ts
            and self.epoch == o.epoch
            and self.payload == o.payload
            and self.frame == o.frame
        )

    def __hash__(self):
        return hash((self.stream_id, self.seq, self.payload))

    def __reduce__(self):
        return (
            Message,
            (self.stream_id, self.seq, self.type, self.ts, self.payload, self.frame, self.epoch),
        )

    def __repr__(self):
        return (
            f"Message({self.stream_id!r}, seq={self.seq}, type={self.type!r}, ts={self.ts}, "
            f"epoch={self.epoch!r}, {len(self.payload)} bytes)"
        )


def ws_text_frame(bytes payload) -> bytes:
    """A final, unmasked text frame (server to client) holding `payload`."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t h = 2 if n < 126 else (4 if n < 0x10000 else 10)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n + h)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    cdef int i
    p[0] = 0x81
    if h == 2:
        p[1] = <unsigned char>n
    elif h == 4:
        p[1] = 126
        p[2] = <unsigned char>(n >> 8)
        p[3] = <unsigned char>(n & 0xFF)
    else:
        p[1] = 127
        for i in range(8):
            p[2 + i] = <unsigned char>((<uint64_t>n >> (56 - 8 * i)) & 0xFF)
    memcpy(p + h, PyBytes_AS_STRING(payload), n)
    return out


# -- value rules (mirror check_str / check_ms / percent_2dp in fastproxy.codec.tables) ------------


cdef inline int check_str(object v, str what) except -1:
    if not PyUnicode_CheckExact(v):
        raise CodecError(f"{what} must be a string, got {type(v).__name__}")
    if not PyUnicode_IS_ASCII(v):
        check_utf8(v, what)  # the pure codecs' rule and error, shared
    return 0


cdef int64_t as_ms(object v, str what) except -1:
    cdef int overflow = 0
    cdef long long x
    if not PyLong_CheckExact(v):
        raise CodecError(f"{what} must be an integer in 0..2**63-1")
    x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow != 0 or x < 0:
        raise CodecError(f"{what} must be an integer in 0..2**63-1")
    return x


cdef inline int as_bool(object v, str what) except -1:
    if v is True:
        return 1
    if v is False:
        return 0
    raise CodecError(f"{what} must be a boolean")


cdef bytes EMPTY_FRAG = b'""'
cdef bytes ZERO_PCT_FRAG = b'"0.00"'


cdef object pct_frag(object s):
    """price24hPcnt -> '"x.yz"' (a fraction as a percentage, 2 decimals, half up), '""' for an
    empty string, None when it is not a plain decimal. See percent_2dp for the rules."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s)
    cdef const char* c
    cdef Py_ssize_t i = 0, ws, we, fs, fe, nd, j, k, start
    cdef bint neg = False
    cdef char small[80]
    cdef char* d
    cdef bytes out
    cdef char* o
    if n == 0:
        return EMPTY_FRAG
    if not PyUnicode_IS_ASCII(s):
        return None  # a decimal is ASCII (check_str has refused what is not UTF-8)
    c = <const char*>PyUnicode_DATA(s)
    if c[0] == 45 or c[0] == 43:  # '-' '+'
        neg = c[0] == 45
        i = 1
    ws = i
    while i < n and 48 <= c[i] <= 57:
        i += 1
    we = i
    fs = fe = i
    if i < n and c[i] == 46:  # '.'
        i += 1
        fs = i
        while i < n and 48 <= c[i] <= 57:
            i += 1
        fe = i
    if i != n or (we == ws and fe == fs):
        return None
    while ws < we and c[ws] == 48:
        ws += 1
    # d[0] takes a carry; d[1..nd] = value * 10**4, truncated, as digits
    nd = (we - ws) + 4
    if nd + 1 <= 80:
        d = small
    else:
        d = <char*>malloc(nd + 1)
    if d == NULL:
        raise MemoryError()
    try:
        d[0] = 48
        memcpy(d + 1, c + ws, we - ws)
        for k in range(4):
            d[1 + (we - ws) + k] = c[fs + k] if fs + k < fe else 48
        if fe - fs > 4 and c[fs + 4] >= 53:  # fifth fractional digit >= '5': round up
            j = nd
            while d[j] == 57:
                d[j] = 48
                j -= 1
            d[j] += 1
        start = 0
        while start <= nd and d[start] == 48:
            start += 1
        k = nd + 1 - start  # significant digits
        if k == 0:
            return ZERO_PCT_FRAG
        # '"' [-] intpart '.' 2 digits '"', intpart "0" when k <= 2
        out = PyBytes_FromStringAndSize(NULL, (1 if neg else 0) + (k - 2 if k > 2 else 1) + 5)
        o = PyBytes_AS_STRING(out)
        o[0] = 0x22
        j = 1
        if neg:
            o[j] = 45
            j += 1
        if k > 2:
            memcpy(o + j, d + start, k - 2)
            j += k - 2
            o[j] = 46
            o[j + 1] = d[nd - 1]
            o[j + 2] = d[nd]
        else:
            o[j] = 48
            o[j + 1] = 46
            o[j + 2] = d[nd - 1] if k == 2 else 48
            o[j + 3] = d[nd]
            j += 1
        o[j + 3] = 0x22
        return out
    finally:
        if d != small:
            free(d)


# -- codecs ---------------------------------------------------------------------------------------


cdef class _Codec:
    """State shared by the three codecs: the stream, its numbering and its last Message."""

    cdef readonly object stream
    cdef readonly str epoch
    cdef int64_t _seq
    cdef str _sid
    cdef bint _fresh
    cdef object _last

    def __init__(self, stream, int64_t seq=0, epoch=None):
        if stream.kind != self._kind():
            raise ValueError(f"{type(self).__name__} serves {self._kind()} streams, not {stream!r}")
        self.stream = stream
        self.epoch = new_epoch() if epoch is None else epoch
        self._seq = seq
        self._sid = stream.stream_id
        self._fresh = True
        self._last = None

    cdef str _kind(self):
        return ""

    @property
    def seq(self) -> int:
        """The last seq assigned (the start value until the first Message)."""
        return self._seq

    def snapshot(self):
        """The current state for a new subscriber: type snapshot, the seq of its last update;
        None when nothing is known. Built on each call: the hub keeps the one it serves."""
        return None if self._last is None else as_snapshot(self._last)

    def reset(self) -> None:
        """Upstream state is gone (reconnect): forget it; the next Message is a snapshot."""
        self._fresh = True
        self._last = None
        self._clear()

    def renumber(self, epoch=None) -> None:
        """A new numbering from here, state and seq kept (a node that serves the stream on its
        own, out of the cluster's line): the next Messages, and the snapshot, carry `epoch`."""
        cdef Message last
        self.epoch = new_epoch() if epoch is None else epoch
        if self._last is not None:
            last = <Message>self._last
            self._last = Message(
                last.stream_id, last.seq, last.type, last.ts, last.payload, last.frame, self.epoch
            )

    cdef void _clear(self):
        pass

    def __repr__(self):
        return f"{type(self).__name__}({self.stream!r}, seq={self._seq}, epoch={self.epoch!r})"


cdef enum:
    MAX_SLOTS = 19  # C array size for the slots one frame touches; checked below
if TICKER_NSLOTS != MAX_SLOTS:
    raise ImportError("ticker slot table and MAX_SLOTS disagree; rebuild fastproxy._codec")
cdef int NSLOTS = TICKER_NSLOTS
cdef int S_PCT = TICKER_PCT
cdef int S_BID_PRICE = TICKER_BID_PRICE
cdef int S_BID_SIZE = TICKER_BID_SIZE
cdef int S_ASK_PRICE = TICKER_ASK_PRICE
cdef int S_ASK_SIZE = TICKER_ASK_SIZE
# What precedes each slot's value in its fragment: `,"key":` for flat fields (`"symbol":` opens
# the object), nothing for the bid/ask parts, which put_side wraps in their nested object.
cdef tuple _TICKER_KEYS = tuple(
    b"" if TICKER_BID_PRICE <= _n <= TICKER_ASK_SIZE
    else (b'"' if _n == 0 else b',"') + _out.encode() + b'":'
    for _n, (_bybit, _out) in enumerate(TICKER_FIELDS)
)
cdef dict _SLOT = dict(TICKER_SLOT)


cdef class TickerCodec(_Codec):
    """Merges Bybit's ticker snapshot and deltas; every Message carries the complete ticker."""

    cdef list _frag  # slot -> key + JSON value of the current value, or None (not known yet)
    cdef list _pend  # slot -> fragment decided by the frame being validated
    cdef bytes _sym_frag
    cdef bytes _pre_snap
    cdef bytes _pre_upd

    def __init__(self, stream, int64_t seq=0, epoch=None):
        _Codec.__init__(self, stream, seq, epoch)
        self._sym_frag = _TICKER_KEYS[0] + _dumps(stream.symbol)
        pre = envelope_prefix(self._sid)
        self._pre_snap = pre + b'snapshot","data":{'
        self._pre_upd = pre + b'update","data":{'
        self._pend = [None] * NSLOTS
        self._clear()

    cdef str _kind(self):
        return TICKER

    cdef void _clear(self):
        self._frag = [None] * NSLOTS
        self._frag[0] = self._sym_frag

    def feed(self, frame) -> list:
        """Apply one Bybit tickers frame; one Message with the complete merged ticker."""
        cdef object data, ftype, ts_o, frag
        cdef int64_t ts
        cdef bint replace
        cdef Py_ssize_t pos = 0
        cdef PyObject* k
        cdef PyObject* v
        cdef PyObject* sp
        cdef int slot, j, nt = 0
        cdef int touched[MAX_SLOTS]
        cdef PyObject* fp
        cdef Message msg
        cdef list frags, pend
        cdef Buf b

        if not PyDict_CheckExact(frame):
            raise CodecError("frame must be a JSON object")
        sp = PyDict_GetItemWithError(frame, "data")
        if sp == NULL or not PyDict_CheckExact(<object>sp):
            raise CodecError("data must be a JSON object")
        data = <object>sp
        sp = PyDict_GetItemWithError(frame, "ts")
        ts = as_ms(<object>sp if sp != NULL else None, "ts")
        ts_o = <object>sp
        sp = PyDict_GetItemWithError(frame, "type")
        ftype = <object>sp if sp != NULL else None
        if ftype == SNAPSHOT:
            replace = True
        elif ftype == "delta":
            replace = False
        else:
            raise CodecError("ticker frame type must be snapshot or delta")

        # Decide every new fragment before touching state: an error leaves the codec as it was.
        pend = self._pend
        while PyDict_Next(data, &pos, &k, &v):
            sp = PyDict_GetItemWithError(_SLOT, <object>k)
            if sp == NULL:
                continue
            slot = <int><object>sp
            check_str(<object>v, <str><object>k)
            if slot == S_PCT:
                frag = pct_frag(<object>v)
                if frag is not None:
                    frag = <bytes>_TICKER_KEYS[slot] + frag
            else:
                frag = str_frag(<object>v, <bytes>_TICKER_KEYS[slot])
            pend[slot] = frag
            touched[nt] = slot
            nt += 1

        frags = self._frag
        if replace:
            self._clear()
            frags = self._frag
        for j in range(nt):
            slot = touched[j]
            frags[slot] = pend[slot]
            pend[slot] = None

        mtype = SNAPSHOT if (replace or self._fresh) else UPDATE
        buf_init(&b)
        try:
            buf_bytes(&b, self._pre_snap if mtype is SNAPSHOT else self._pre_upd)
            # The list owns the fragments for the whole assembly, so borrowed pointers do.
            put_frag(&b, PyList_GET_ITEM(frags, 0))
            for slot in range(1, S_BID_PRICE):
                fp = PyList_GET_ITEM(frags, slot)
                if fp != <PyObject*>None:
                    put_frag(&b, fp)
            put_side(
                &b, b',"bid":{', PyList_GET_ITEM(frags, S_BID_PRICE), PyList_GET_ITEM(frags, S_BID_SIZE)
            )
            put_side(
                &b, b',"ask":{', PyList_GET_ITEM(frags, S_ASK_PRICE), PyList_GET_ITEM(frags, S_ASK_SIZE)
            )
            for slot in range(S_ASK_SIZE + 1, NSLOTS):
                fp = PyList_GET_ITEM(frags, slot)
                if fp != <PyObject*>None:
                    put_frag(&b, fp)
            buf_put(&b, b'}', 1)
            put_tail(&b, ts, self._seq + 1)
            msg = buf_message(&b, self._sid, self._seq + 1, mtype, ts_o, self.epoch)
        finally:
            buf_free(&b)
        self._seq += 1
        self._fresh = False
        self._last = msg
        return [msg]


cdef inline int put_frag(Buf* b, PyObject* frag) except -1:
    return buf_put(b, ptr_bytes_data(frag), ptr_bytes_len(frag))


cdef int put_side(Buf* b, const char* head, PyObject* price, PyObject* size) except -1:
    cdef PyObject* none = <PyObject*>None
    if price == none and size == none:
        return 0
    buf_put(b, head, 8)  # `,"bid":{` or `,"ask":{`
    if price != none:
        buf_put(b, b'"price":', 8)
        put_frag(b, price)
        if size != none:
            buf_put(b, b',', 1)
    if size != none:
        buf_put(b, b'"size":', 7)
        put_frag(b, size)
    return buf_put(b, b'}', 1)


cdef int put_tail(Buf* b, int64_t ts, int64_t seq) except -1:
    buf_put(b, b',"timestamp":', 13)
    buf_int(b, ts)
    buf_put(b, b',"source":"mudrex","seq":', 25)
    buf_int(b, seq)
    return buf_put(b, b'}', 1)


cdef bytes _key(str key):
    """`,"key":`, the bytes in front of a value that follows another one."""
    return b',"' + key.encode() + b'":'


# The kline tables as fragments: every key is copied from here, never spelled out below.
cdef bytes _K_CLOSE_TIME = _key(KLINE_TIMES[1][1])
cdef tuple _K_VALUE_FIELDS = tuple(_field for _field, _out in KLINE_VALUES)
cdef tuple _K_VALUE_KEYS = tuple(_key(_out) for _field, _out in KLINE_VALUES)
cdef Py_ssize_t _K_NVALUES = len(KLINE_VALUES)
cdef bytes _K_TRUE = _key(KLINE_CONFIRMED[1]) + b"true}"
cdef bytes _K_FALSE = _key(KLINE_CONFIRMED[1]) + b"false}"


cdef class KlineCodec(_Codec):
    """One Message per candle in a Bybit kline frame, in order."""

    cdef bytes _pre_snap
    cdef bytes _pre_upd

    def __init__(self, stream, int64_t seq=0, epoch=None):
        _Codec.__init__(self, stream, seq, epoch)
        pre = envelope_prefix(self._sid)
        fixed = (
            b'","data":{"symbol":' + _dumps(stream.symbol)
            + b',"interval":' + _dumps(stream.interval) + _key(KLINE_TIMES[0][1])
        )
        self._pre_snap = pre + b"snapshot" + fixed
        self._pre_upd = pre + b"update" + fixed

    cdef str _kind(self):
        return KLINE

    def feed(self, frame) -> list:
        """One Message per candle of one Bybit kline frame."""
        cdef object data, c, ts_o
        cdef dict cd
        cdef PyObject* sp
        cdef int64_t ts, seq
        cdef Py_ssize_t i, j, n
        cdef bint fresh
        cdef str field
        cdef list out = []
        cdef Buf b

        if not PyDict_CheckExact(frame):
            raise CodecError("frame must be a JSON object")
        sp = PyDict_GetItemWithError(frame, "data")
        if sp == NULL or not PyList_CheckExact(<object>sp):
            raise CodecError("data must be a JSON array")
        data = <object>sp
        sp = PyDict_GetItemWithError(frame, "ts")
        ts = as_ms(<object>sp if sp != NULL else None, "ts")
        ts_o = <object>sp

        seq = self._seq
        fresh = self._fresh
        n = PyList_GET_SIZE(data)
        buf_init(&b)
        try:
            for i in range(n):
                c = <object>PyList_GET_ITEM(data, i)
                if not PyDict_CheckExact(c):
                    raise CodecError("a kline must be a JSON object")
                cd = <dict>c
                b.n = HEAD
                seq += 1
                buf_bytes(&b, self._pre_snap if fresh else self._pre_upd)
                field = KLINE_TIMES[0][0]
                buf_int(&b, as_ms(cd.get(field), field))
                buf_bytes(&b, _K_CLOSE_TIME)
                field = KLINE_TIMES[1][0]
                buf_int(&b, as_ms(cd.get(field), field))
                for j in range(_K_NVALUES):
                    field = <str>_K_VALUE_FIELDS[j]
                    put_str_field(&b, <bytes>_K_VALUE_KEYS[j], cd.get(field), field)
                field = KLINE_CONFIRMED[0]
                buf_bytes(&b, _K_TRUE if as_bool(cd.get(field), field) else _K_FALSE)
                put_tail(&b, ts, seq)
                out.append(
                    buf_message(
                        &b, self._sid, seq, SNAPSHOT if fresh else UPDATE, ts_o, self.epoch
                    )
                )
                fresh = False
        finally:
            buf_free(&b)
        if n:
            self._seq = seq
            self._fresh = False
            self._last = out[n - 1]
        return out


cdef inline int put_str_field(Buf* b, bytes key, object v, str what) except -1:
    check_str(v, what)
    buf_bytes(b, key)
    return buf_str(b, v)


# The trade tables as fragments, as for klines.
cdef str _T_ID = TRADE_ID[0]
cdef bytes _T_ID_FIRST = b'{"' + TRADE_ID[1].encode() + b'":'
cdef bytes _T_ID_NEXT = b"," + _T_ID_FIRST
cdef str _T_SYMBOL = TRADE_SYMBOL[0]
cdef bytes _T_SYMBOL_KEY = _key(TRADE_SYMBOL[1])
cdef tuple _T_VALUE_FIELDS = tuple(_field for _field, _out in TRADE_VALUES)
cdef tuple _T_VALUE_KEYS = tuple(_key(_out) for _field, _out in TRADE_VALUES)
cdef Py_ssize_t _T_NVALUES = len(TRADE_VALUES)
cdef str _T_SIDE = TRADE_SIDE[0]
cdef str _T_SIDE_ERROR = f"trade side {TRADE_SIDE[0]} must be Buy or Sell"
# Bybit side -> `,"side":"buy","time":`: the side and the key of the time that follows it
cdef dict _T_SIDE_FRAGS = {
    _bybit: _key(TRADE_SIDE[1]) + _dumps(_out) + _key(TRADE_TIME[1])
    for _bybit, _out in TRADE_SIDES.items()
}
cdef str _T_TIME = TRADE_TIME[0]
cdef str _T_BLOCK = TRADE_BLOCK[0]
cdef bytes _T_BLOCK_TRUE = _key(TRADE_BLOCK[1]) + b"true}"
cdef bytes _T_BLOCK_FALSE = _key(TRADE_BLOCK[1]) + b"false}"


cdef class TradeCodec(_Codec):
    """One Message per Bybit trade frame; its data lists the frame's trades in order."""

    cdef bytes _sym_frag
    cdef bytes _pre_snap
    cdef bytes _pre_upd

    def __init__(self, stream, int64_t seq=0, epoch=None):
        _Codec.__init__(self, stream, seq, epoch)
        self._sym_frag = _dumps(stream.symbol)
        pre = envelope_prefix(self._sid)
        self._pre_snap = pre + b'snapshot","data":['
        self._pre_upd = pre + b'update","data":['

    cdef str _kind(self):
        return TRADE

    def feed(self, frame) -> list:
        """One Message for one Bybit publicTrade frame (none for an empty one)."""
        cdef object data, t, ts_o, side, sym, block
        cdef dict td
        cdef PyObject* sp
        cdef int64_t ts, seq
        cdef Py_ssize_t i, j, n
        cdef str field
        cdef Buf b
        cdef Message msg

        if not PyDict_CheckExact(frame):
            raise CodecError("frame must be a JSON object")
        sp = PyDict_GetItemWithError(frame, "data")
        if sp == NULL or not PyList_CheckExact(<object>sp):
            raise CodecError("data must be a JSON array")
        data = <object>sp
        sp = PyDict_GetItemWithError(frame, "ts")
        ts = as_ms(<object>sp if sp != NULL else None, "ts")
        ts_o = <object>sp

        n = PyList_GET_SIZE(data)
        seq = self._seq + 1
        buf_init(&b)
        try:
            buf_bytes(&b, self._pre_snap if self._fresh else self._pre_upd)
            for i in range(n):
                t = <object>PyList_GET_ITEM(data, i)
                if not PyDict_CheckExact(t):
                    raise CodecError("a trade must be a JSON object")
                td = <dict>t
                put_str_field(&b, _T_ID_FIRST if i == 0 else _T_ID_NEXT, td.get(_T_ID), _T_ID)
                sym = td.get(_T_SYMBOL)
                buf_bytes(&b, _T_SYMBOL_KEY)
                if sym is None:
                    buf_bytes(&b, self._sym_frag)
                else:
                    check_str(sym, _T_SYMBOL)
                    buf_str(&b, sym)
                for j in range(_T_NVALUES):
                    field = <str>_T_VALUE_FIELDS[j]
                    put_str_field(&b, <bytes>_T_VALUE_KEYS[j], td.get(field), field)
                side = td.get(_T_SIDE)
                sp = PyDict_GetItemWithError(_T_SIDE_FRAGS, side) if PyUnicode_CheckExact(side) else NULL
                if sp == NULL:
                    raise CodecError(_T_SIDE_ERROR)
                put_frag(&b, sp)
                buf_int(&b, as_ms(td.get(_T_TIME), _T_TIME))
                block = td.get(_T_BLOCK)
                if block is None:
                    buf_put(&b, b'}', 1)
                else:
                    buf_bytes(&b, _T_BLOCK_TRUE if as_bool(block, _T_BLOCK) else _T_BLOCK_FALSE)
            if n == 0:
                return []
            buf_put(&b, b']', 1)
            put_tail(&b, ts, seq)
            msg = buf_message(
                &b, self._sid, seq, SNAPSHOT if self._fresh else UPDATE, ts_o, self.epoch
            )
        finally:
            buf_free(&b)
        self._seq = seq
        self._fresh = False
        self._last = msg
        return [msg]


cdef class LiquidationCodec(_Codec):
    """One Message per Bybit allLiquidation frame; its data lists the events in exchange order."""

    cdef bytes _sym_frag
    cdef bytes _pre_snap
    cdef bytes _pre_upd

    def __init__(self, stream, int64_t seq=0, epoch=None):
        _Codec.__init__(self, stream, seq, epoch)
        self._sym_frag = _dumps(stream.symbol)
        pre = envelope_prefix(self._sid)
        self._pre_snap = pre + b'snapshot","data":['
        self._pre_upd = pre + b'update","data":['

    cdef str _kind(self):
        return LIQUIDATION

    def feed(self, frame) -> list:
        """One Message for one Bybit allLiquidation frame (none for an empty one)."""
        cdef object data, e, ts_o, side, sym
        cdef dict ed
        cdef PyObject* sp
        cdef int64_t ts, seq
        cdef Py_ssize_t i, n
        cdef Buf b
        cdef Message msg

        if not PyDict_CheckExact(frame):
            raise CodecError("frame must be a JSON object")
        sp = PyDict_GetItemWithError(frame, "data")
        if sp == NULL or not PyList_CheckExact(<object>sp):
            raise CodecError("data must be a JSON array")
        data = <object>sp
        sp = PyDict_GetItemWithError(frame, "ts")
        ts = as_ms(<object>sp if sp != NULL else None, "ts")
        ts_o = <object>sp

        n = PyList_GET_SIZE(data)
        seq = self._seq + 1
        buf_init(&b)
        try:
            buf_bytes(&b, self._pre_snap if self._fresh else self._pre_upd)
            for i in range(n):
                e = <object>PyList_GET_ITEM(data, i)
                if not PyDict_CheckExact(e):
                    raise CodecError("a liquidation must be a JSON object")
                ed = <dict>e
                sym = ed.get("s")
                buf_put(&b, b'{"symbol":' if i == 0 else b',{"symbol":', 10 if i == 0 else 11)
                if sym is None:
                    buf_bytes(&b, self._sym_frag)
                else:
                    check_str(sym, "s")
                    buf_str(&b, sym)
                side = ed.get("S")
                if PyUnicode_CheckExact(side) and side == "Buy":
                    buf_put(&b, b',"side":"buy"', 13)
                elif PyUnicode_CheckExact(side) and side == "Sell":
                    buf_put(&b, b',"side":"sell"', 14)
                else:
                    raise CodecError("liquidation side S must be Buy or Sell")
                put_str_field(&b, b',"price":', ed.get("p"), "p")
                put_str_field(&b, b',"quantity":', ed.get("v"), "v")
                buf_put(&b, b',"time":', 8)
                buf_int(&b, as_ms(ed.get("T"), "T"))
                buf_put(&b, b'}', 1)
            if n == 0:
                return []
            buf_put(&b, b']', 1)
            put_tail(&b, ts, seq)
            msg = buf_message(
                &b, self._sid, seq, SNAPSHOT if self._fresh else UPDATE, ts_o, self.epoch
            )
        finally:
            buf_free(&b)
        self._seq = seq
        self._fresh = False
        self._last = msg
        return [msg]


if LIQUIDATION_SIDES != {"Buy": "buy", "Sell": "sell"}:
    raise ImportError("liquidation side table changed; update LiquidationCodec.feed")


# -- books ----------------------------------------------------------------------------------------
# A side is a C array of levels sorted by price value, ascending (the best bid is the last, the
# best ask the first), each holding references to the exchange's own price and size strings:
# applying a delta allocates nothing, and a snapshot walks the array in output order.

cdef struct Key:  # a price's exact value: integer part, fraction in PRICE_FRACTION digits
    uint64_t whole
    uint64_t frac

cdef struct Level:
    Key key
    PyObject* price  # owned references
    PyObject* size

cdef struct Side:
    Level* lv
    Py_ssize_t n
    Py_ssize_t cap


cdef int side_reserve(Side* s, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap
    cdef Level* q
    if need <= s.cap:
        return 0
    cap = s.cap * 2 if s.cap else 64
    if cap < need:
        cap = need
    q = <Level*>realloc(s.lv, cap * sizeof(Level))
    if q == NULL:
        raise MemoryError()
    s.lv = q
    s.cap = cap
    return 0


cdef void side_drop(Side* s, Py_ssize_t start, Py_ssize_t stop) noexcept:
    """Remove levels [start, stop)."""
    cdef Py_ssize_t i
    for i in range(start, stop):
        Py_DECREF(s.lv[i].price)
        Py_DECREF(s.lv[i].size)
    if stop < s.n:
        memmove(s.lv + start, s.lv + stop, (s.n - stop) * sizeof(Level))
    s.n -= stop - start


cdef inline bint key_lt(Key a, Key b) noexcept:
    return a.whole < b.whole or (a.whole == b.whole and a.frac < b.frac)


cdef inline bint key_eq(Key a, Key b) noexcept:
    return a.whole == b.whole and a.frac == b.frac


cdef inline Py_ssize_t side_find(Side* s, Key key) noexcept:
    """Index of the first level whose key is >= key."""
    cdef Py_ssize_t lo = 0, hi = s.n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if key_lt(s.lv[mid].key, key):
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef int side_apply(Side* s, Key key, PyObject* price, PyObject* size, bint deletes) except -1:
    cdef Py_ssize_t i = side_find(s, key)
    cdef bint found = i < s.n and key_eq(s.lv[i].key, key)
    cdef Level* lv
    if deletes:
        if found:
            side_drop(s, i, i + 1)
        return 0
    if found:
        lv = s.lv + i
        Py_INCREF(price)
        Py_INCREF(size)
        Py_DECREF(lv.price)
        Py_DECREF(lv.size)
        lv.price = price
        lv.size = size
        return 0
    side_reserve(s, s.n + 1)
    if i < s.n:
        memmove(s.lv + i + 1, s.lv + i, (s.n - i) * sizeof(Level))
    lv = s.lv + i
    Py_INCREF(price)
    Py_INCREF(size)
    lv.key = key
    lv.price = price
    lv.size = size
    s.n += 1
    return 0


cdef uint64_t POW10[20]
POW10[0] = 1
for _i in range(1, 20):
    POW10[_i] = POW10[_i - 1] * 10
cdef int INT_DIGITS = PRICE_INT_DIGITS
cdef int FRACTION = PRICE_FRACTION
if INT_DIGITS > 19 or FRACTION > 19:
    raise ImportError("price key limits do not fit 64 bits; rebuild fastproxy._codec")


cdef int parse_decimal(object v, Key* key, bint* zero) noexcept:
    """The book grammar (see DECIMAL_RE): 1 when `v` is exactly such a str, with its exact
    value in `key` and whether every digit is 0; 0 when it is not one; 2 when it is one whose
    value does not fit a key (see price_key)."""
    cdef Py_ssize_t n, i = 0, j, digits = 0
    cdef const char* c
    cdef bint allzero = True
    cdef uint64_t whole = 0, frac = 0
    cdef bint fits = True
    if not PyUnicode_CheckExact(v) or not PyUnicode_IS_ASCII(v):
        return 0
    n = PyUnicode_GET_LENGTH(v)
    c = <const char*>PyUnicode_DATA(v)
    while i < n and 48 <= c[i] <= 57:
        if c[i] != 48:
            allzero = False
        if not allzero:
            digits += 1
            if digits <= INT_DIGITS:
                whole = whole * 10 + <uint64_t>(c[i] - 48)
        i += 1
    if i == 0:
        return 0
    if digits > INT_DIGITS:
        fits = False
    if i < n:
        if c[i] != 46:  # '.'
            return 0
        i += 1
        j = i
        while i < n and 48 <= c[i] <= 57:
            if c[i] != 48:
                allzero = False
            if i - j < FRACTION:
                frac = frac * 10 + <uint64_t>(c[i] - 48)
            i += 1
        if i == j or i != n:
            return 0
        if i - j > FRACTION:
            fits = False
        else:
            frac *= POW10[FRACTION - (i - j)]
    else:
        frac = 0
    key.whole = whole
    key.frac = frac
    zero[0] = allzero
    return 1 if fits else 2


cdef int parse_price(object v, Key* key, str what) except -1:
    cdef bint zero
    cdef int r = parse_decimal(v, key, &zero)
    if r == 0:
        raise CodecError(f"a price of {what} must be a decimal string")
    if r == 2:
        raise CodecError(f"a price of {what} is out of range")
    return 0


cdef int parse_size(object v, bint* zero, str what) except -1:
    cdef Key ignored
    if parse_decimal(v, &ignored, zero) == 0:
        raise CodecError(f"a size of {what} must be a decimal string")
    return 0


cdef int put_level(Buf* b, PyObject* price, PyObject* size, bint first) except -1:
    if first:
        buf_put(b, b'[', 1)
    else:
        buf_put(b, b',[', 2)
    buf_str(b, <object>price)
    buf_put(b, b',', 1)
    buf_str(b, <object>size)
    return buf_put(b, b']', 1)


@cython.final
cdef class BookCodec(_Codec):
    """The book of one orderbook topic: see fastproxy.codec.book for the rules, which this
    twin follows to the byte."""

    cdef Side _bids
    cdef Side _asks
    cdef Py_ssize_t _depth
    cdef bint _held  # a book is held (else: waiting for the exchange's snapshot)
    cdef int64_t _u
    cdef int64_t _cts
    cdef int64_t _ts
    cdef readonly object resync  # why the last feed() rebuilt or dropped the book, or None
    cdef bint _resubscribe
    cdef bytes _pre_snap
    cdef bytes _pre_upd
    # per-level parse results of the frame being applied (grown, never shrunk)
    cdef Key* _keys
    cdef char* _zero
    cdef Py_ssize_t _kcap
    cdef object _snap  # the whole book as a snapshot Message, built once per change

    def __init__(self, stream, int64_t seq=0, epoch=None):
        _Codec.__init__(self, stream, seq, epoch)
        self._depth = stream.depth
        self.resync = None
        pre = envelope_prefix(self._sid)
        sym = b'","data":{"symbol":' + _dumps(stream.symbol) + b',"bids":'
        self._pre_snap = pre + b"snapshot" + sym
        self._pre_upd = pre + b"update" + sym

    def __dealloc__(self):
        side_drop(&self._bids, 0, self._bids.n)
        side_drop(&self._asks, 0, self._asks.n)
        free(self._bids.lv)
        free(self._asks.lv)
        free(self._keys)
        free(self._zero)

    cdef str _kind(self):
        return ORDERBOOK

    cdef void _clear(self):
        side_drop(&self._bids, 0, self._bids.n)
        side_drop(&self._asks, 0, self._asks.n)
        self._held = False
        self._snap = None

    cdef void _untrust(self, str reason):
        self._clear()
        self.resync = reason
        self._resubscribe = True

    def take_resync(self):
        """The pending resync's reason and whether the topic must be subscribed again; clears it."""
        reason = self.resync
        again = self._resubscribe
        self.resync = None
        self._resubscribe = False
        return (reason or "", bool(again))

    def snapshot(self):
        """The whole book as a `snapshot` Message at the last seq, or None while there is none.
        Built once per change of the book."""
        if not self._held:
            return None
        if self._snap is None:
            self._snap = self._book_message()
        return self._snap

    def renumber(self, epoch=None) -> None:
        """A new numbering from here, the book and seq kept (see _Codec.renumber)."""
        self.epoch = new_epoch() if epoch is None else epoch
        self._snap = None

    def feed(self, frame) -> list:
        """Apply one Bybit orderbook frame; the Message it makes (none while the book is being
        rebuilt). A frame that cannot be read raises CodecError and drops the book."""
        try:
            return self._feed(frame)
        except CodecError:
            if self._held:
                self._untrust(RESYNC_MALFORMED)
            raise

    cdef int _reserve(self, Py_ssize_t need) except -1:
        cdef Key* k
        cdef char* z
        if need <= self._kcap:
            return 0
        if need < 256:
            need = 256
        k = <Key*>realloc(self._keys, need * sizeof(Key))
        if k == NULL:
            raise MemoryError()
        self._keys = k
        z = <char*>realloc(self._zero, need)
        if z == NULL:
            raise MemoryError()
        self._zero = z
        self._kcap = need
        return 0

    cdef int _parse(self, object side, Py_ssize_t at, str what) except -1:
        cdef Py_ssize_t i, n = PyList_GET_SIZE(side)
        cdef object level
        cdef bint zero
        for i in range(n):
            level = <object>PyList_GET_ITEM(side, i)
            if not PyList_CheckExact(level) or PyList_GET_SIZE(level) != 2:
                raise CodecError(f"a level of {what} must be [price, size]")
            parse_price(<object>PyList_GET_ITEM(level, 0), self._keys + at + i, what)
            parse_size(<object>PyList_GET_ITEM(level, 1), &zero, what)
            self._zero[at + i] = zero
        return 0

    cdef void _apply(self, Side* s, object side, Py_ssize_t at) except *:
        cdef Py_ssize_t i, n = PyList_GET_SIZE(side)
        cdef PyObject* level
        for i in range(n):
            level = PyList_GET_ITEM(side, i)
            side_apply(
                s,
                self._keys[at + i],
                PyList_GET_ITEM(<object>level, 0),
                PyList_GET_ITEM(<object>level, 1),
                self._zero[at + i],
            )

    cdef list _feed(self, object frame):
        cdef PyObject* sp
        cdef object data, ftype, bids, asks, reason
        cdef int64_t ts, cts, u, last
        cdef Py_ssize_t nb, na
        cdef Buf b
        cdef Message msg

        if not PyDict_CheckExact(frame):
            raise CodecError("frame must be a JSON object")
        sp = PyDict_GetItemWithError(frame, "data")
        if sp == NULL or not PyDict_CheckExact(<object>sp):
            raise CodecError("data must be a JSON object")
        data = <object>sp
        sp = PyDict_GetItemWithError(frame, "ts")
        ts = as_ms(<object>sp if sp != NULL else None, "ts")
        sp = PyDict_GetItemWithError(frame, "cts")
        cts = ts if sp == NULL or <object>sp is None else as_ms(<object>sp, "cts")
        sp = PyDict_GetItemWithError(data, "u")
        u = as_ms(<object>sp if sp != NULL else None, "u")
        sp = PyDict_GetItemWithError(frame, "type")
        ftype = <object>sp if sp != NULL else None
        if not (PyUnicode_CheckExact(ftype) and (ftype == SNAPSHOT or ftype == "delta")):
            raise CodecError("orderbook frame type must be snapshot or delta")
        sp = PyDict_GetItemWithError(data, "b")
        if sp == NULL or not PyList_CheckExact(<object>sp):
            raise CodecError("b must be a JSON array")
        bids = <object>sp
        sp = PyDict_GetItemWithError(data, "a")
        if sp == NULL or not PyList_CheckExact(<object>sp):
            raise CodecError("a must be a JSON array")
        asks = <object>sp
        nb = PyList_GET_SIZE(bids)
        na = PyList_GET_SIZE(asks)
        self._reserve(nb + na)
        self._parse(bids, 0, "b")
        self._parse(asks, nb, "a")
        last = self._u

        if ftype == SNAPSHOT:
            if self._held:
                reason = None
                if self._depth == 1:
                    if u == 1 and last != 1:
                        reason = RESYNC_RESTART
                    elif u < last:
                        reason = RESYNC_BACKWARD
                else:
                    reason = RESYNC_RESTART if u == 1 else RESYNC_SNAPSHOT
                if reason is not None:
                    self.resync = reason
            side_drop(&self._bids, 0, self._bids.n)
            side_drop(&self._asks, 0, self._asks.n)
            self._apply(&self._bids, bids, 0)
            self._apply(&self._asks, asks, nb)
            if self._bids.n > self._depth:  # keep the best DEPTH levels
                side_drop(&self._bids, 0, self._bids.n - self._depth)
            if self._asks.n > self._depth:
                side_drop(&self._asks, self._depth, self._asks.n)
            self._held = True
            self._u = u
            self._cts = cts
            self._ts = ts
            self._seq += 1
            self._snap = None
            return [self.snapshot()]

        if not self._held:
            return []  # an old subscription's delta, or one before the first snapshot
        if u != last + 1:
            if u == 1:
                self._untrust(RESYNC_RESTART)
            elif u == last:
                self._untrust(RESYNC_REPEAT)
            elif u < last:
                self._untrust(RESYNC_BACKWARD)
            else:
                self._untrust(RESYNC_GAP)
            return []
        self._apply(&self._bids, bids, 0)
        self._apply(&self._asks, asks, nb)
        if (
            self._bids.n and self._asks.n
            and not key_lt(self._bids.lv[self._bids.n - 1].key, self._asks.lv[0].key)
        ):
            self._untrust(RESYNC_CROSSED)
            return []
        if self._bids.n > self._depth or self._asks.n > self._depth:
            self._untrust(RESYNC_OVERFLOW)
            return []
        self._u = u
        self._cts = cts
        self._ts = ts
        self._seq += 1
        self._snap = None
        if self._depth == 1:
            return [self.snapshot()]
        buf_init(&b)
        try:
            buf_bytes(&b, self._pre_upd)
            put_frame_levels(&b, bids)
            buf_put(&b, b',"asks":', 8)
            put_frame_levels(&b, asks)
            self._put_tail(&b)
            msg = buf_message(&b, self._sid, self._seq, UPDATE, self._ts, self.epoch)
        finally:
            buf_free(&b)
        return [msg]

    cdef int _put_tail(self, Buf* b) except -1:
        buf_put(b, b',"updateId":', 12)
        buf_int(b, self._u)
        buf_put(b, b',"time":', 8)
        buf_int(b, self._cts)
        buf_put(b, b'}', 1)
        return put_tail(b, self._ts, self._seq)

    cdef Message _book_message(self):
        cdef Buf b
        cdef Py_ssize_t i
        cdef Level* lv
        cdef Message msg
        buf_init(&b)
        try:
            buf_bytes(&b, self._pre_snap)
            buf_put(&b, b'[', 1)
            lv = self._bids.lv
            for i in range(self._bids.n - 1, -1, -1):
                put_level(&b, lv[i].price, lv[i].size, i == self._bids.n - 1)
            buf_put(&b, b'],"asks":[', 10)
            lv = self._asks.lv
            for i in range(self._asks.n):
                put_level(&b, lv[i].price, lv[i].size, i == 0)
            buf_put(&b, b']', 1)
            self._put_tail(&b)
            msg = buf_message(&b, self._sid, self._seq, SNAPSHOT, self._ts, self.epoch)
        finally:
            buf_free(&b)
        return msg

    def follow(self, message) -> None:
        """Take a Message of this stream made by another node's codec (a cluster follower keeps
        the book this way to serve its own late joiners)."""
        cdef Key key
        cdef bint zero
        cdef Side* s
        doc = orjson.loads(message.payload)
        data = doc["data"]
        if message.type == SNAPSHOT:
            side_drop(&self._bids, 0, self._bids.n)
            side_drop(&self._asks, 0, self._asks.n)
        for name in ("bids", "asks"):
            s = &self._bids if name == "bids" else &self._asks
            for level in data[name]:
                price, size = level
                parse_price(price, &key, "a followed book")
                parse_size(size, &zero, "a followed book")
                side_apply(s, key, <PyObject*>price, <PyObject*>size, zero)
        self._u = data["updateId"]
        self._cts = data["time"]
        self._ts = message.ts
        self._seq = message.seq
        self.epoch = message.epoch
        self._held = True
        self._snap = message if message.type == SNAPSHOT else None

    def __repr__(self):
        return f"BookCodec({self.stream!r}, seq={self._seq}, u={self._u if self._held else None})"


cdef inline int put_frame_levels(Buf* b, object side) except -1:
    """A frame's validated [price, size] pairs, in frame order."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(side)
    cdef PyObject* level
    buf_put(b, b'[', 1)
    for i in range(n):
        level = PyList_GET_ITEM(side, i)
        put_level(b, PyList_GET_ITEM(<object>level, 0), PyList_GET_ITEM(<object>level, 1), i == 0)
    return buf_put(b, b']', 1)
