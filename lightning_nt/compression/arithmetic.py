"""A bit stream and an adaptive arithmetic coder: the entropy-coding half of a model's description.

The coder is the integer coder of Witten, Neal & Cleary with 48-bit registers and an adaptive
Krichevsky-Trofimov model per tensor (every symbol starts with count 1/2), so no frequency table
has to be transmitted: the first symbols cost more, and the code length approaches the empirical
entropy. Its final two bits pin down an interval that lies inside the coder's last range whatever
follows, so the code is prefix-free and a decoder that knows how many symbols to read stops exactly
at the end of the stream. :func:`adaptive_code_length` is the ideal length of that code in closed
form (the real coder spends at most a couple of bits more), used to rank candidate encodings
without running the coder on each.
"""

from __future__ import annotations

import math
import struct
from bisect import bisect_right
from collections.abc import Iterable, Sequence

__all__ = ["ArithmeticDecoder", "ArithmeticEncoder", "BitReader", "BitWriter", "adaptive_code_length"]

_PRECISION = 48
_FULL = 1 << _PRECISION
_HALF = _FULL >> 1
_QUARTER = _FULL >> 2
_THREE_QUARTERS = 3 * _QUARTER


class BitWriter:
    """Bits appended one field at a time; ``len()`` is the exact length of the stream in bits.

    Examples:
        >>> writer = BitWriter()
        >>> writer.write_uint(5, width=3); writer.write_float16(0.5)
        >>> reader = BitReader(writer.bits)
        >>> reader.read_uint(3), reader.read_float16(), len(writer)
        (5, 0.5, 19)
    """

    def __init__(self) -> None:
        self.bits: list[int] = []

    def __len__(self) -> int:
        return len(self.bits)

    def write_bit(self, bit: int) -> None:
        self.bits.append(bit)

    def write_uint(self, value: int, width: int) -> None:
        """``value`` in ``width`` bits, most significant first (``width`` may be 0 for a value of 0)."""
        if not 0 <= value < (1 << width) and not (value == 0 and width == 0):
            raise ValueError(f"{value} does not fit in {width} bits.")
        self.bits.extend((value >> shift) & 1 for shift in range(width - 1, -1, -1))

    def write_float16(self, value: float) -> None:
        """An IEEE half-precision number (16 bits); the value must be representable without overflow."""
        (raw,) = struct.unpack("<H", struct.pack("<e", value))
        self.write_uint(raw, 16)

    def to_bytes(self) -> bytes:
        """The stream packed into bytes, zero-padded to a whole byte."""
        padded = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(int("".join(map(str, padded[i : i + 8])), 2) for i in range(0, len(padded), 8))


class BitReader:
    """Reads back what a :class:`BitWriter` wrote; past the end it reads zeros (as a decoder pads)."""

    def __init__(self, bits: Sequence[int]) -> None:
        self._bits = bits
        self.position = 0

    def read_bit(self) -> int:
        bit = self._bits[self.position] if self.position < len(self._bits) else 0
        self.position += 1
        return bit

    def read_uint(self, width: int) -> int:
        value = 0
        for _ in range(width):
            value = (value << 1) | self.read_bit()
        return value

    def read_float16(self) -> float:
        (value,) = struct.unpack("<e", struct.pack("<H", self.read_uint(16)))
        return value


class _AdaptiveModel:
    """Krichevsky-Trofimov counts in units of 1/2: every symbol starts at 1, each occurrence adds 2."""

    def __init__(self, alphabet_size: int) -> None:
        self.cumulative = list(range(alphabet_size + 1))

    @property
    def total(self) -> int:
        return self.cumulative[-1]

    def update(self, symbol: int) -> None:
        cumulative = self.cumulative
        for index in range(symbol + 1, len(cumulative)):
            cumulative[index] += 2


class ArithmeticEncoder:
    """Encodes sequences of symbols into a :class:`BitWriter`; call :meth:`finish` once at the end.

    Examples:
        >>> writer = BitWriter()
        >>> encoder = ArithmeticEncoder(writer)
        >>> encoder.encode([0, 0, 1, 0, 2, 0, 0, 0], alphabet_size=3); encoder.finish()
        >>> ArithmeticDecoder(BitReader(writer.bits)).decode(8, alphabet_size=3)
        [0, 0, 1, 0, 2, 0, 0, 0]
    """

    def __init__(self, writer: BitWriter) -> None:
        self._writer = writer
        self._low, self._high, self._pending = 0, _FULL - 1, 0

    def encode(self, symbols: Iterable[int], alphabet_size: int) -> None:
        """Encode ``symbols`` (each in ``[0, alphabet_size)``) with a fresh adaptive model."""
        model = _AdaptiveModel(alphabet_size)
        for symbol in symbols:
            self._narrow(model.cumulative[symbol], model.cumulative[symbol + 1], model.total)
            model.update(symbol)

    def finish(self) -> None:
        self._pending += 1
        self._emit(0 if self._low < _QUARTER else 1)

    def _narrow(self, cumulative_low: int, cumulative_high: int, total: int) -> None:
        span = self._high - self._low + 1
        self._high = self._low + span * cumulative_high // total - 1
        self._low = self._low + span * cumulative_low // total
        while (offset := _rescaling_offset(self._low, self._high)) is not None:
            if offset == _QUARTER:
                self._pending += 1
            else:
                self._emit(0 if offset == 0 else 1)
            self._low = 2 * (self._low - offset)
            self._high = 2 * (self._high - offset) + 1

    def _emit(self, bit: int) -> None:
        self._writer.write_bit(bit)
        self._writer.bits.extend([1 - bit] * self._pending)
        self._pending = 0


class ArithmeticDecoder:
    """Decodes what :class:`ArithmeticEncoder` wrote, given each sequence's length and alphabet size."""

    def __init__(self, reader: BitReader) -> None:
        self._reader = reader
        self._low, self._high = 0, _FULL - 1
        self._value = reader.read_uint(_PRECISION)

    def decode(self, count: int, alphabet_size: int) -> list[int]:
        model = _AdaptiveModel(alphabet_size)
        symbols = []
        for _ in range(count):
            span = self._high - self._low + 1
            target = ((self._value - self._low + 1) * model.total - 1) // span
            symbol = bisect_right(model.cumulative, target) - 1
            self._high = self._low + span * model.cumulative[symbol + 1] // model.total - 1
            self._low = self._low + span * model.cumulative[symbol] // model.total
            self._normalize()
            model.update(symbol)
            symbols.append(symbol)
        return symbols

    def _normalize(self) -> None:
        while (offset := _rescaling_offset(self._low, self._high)) is not None:
            self._low = 2 * (self._low - offset)
            self._high = 2 * (self._high - offset) + 1
            self._value = 2 * (self._value - offset) + self._reader.read_bit()


def _rescaling_offset(low: int, high: int) -> int | None:
    """What to subtract before doubling the interval ``[low, high]``: 0 (lower half, bit 0), ``1/2`` (upper
    half, bit 1), ``1/4`` (straddles the middle narrowly: the bit is decided later), or None (wide enough)."""
    if high < _HALF:
        return 0
    if low >= _HALF:
        return _HALF
    if low >= _QUARTER and high < _THREE_QUARTERS:
        return _QUARTER
    return None


def adaptive_code_length(counts: Sequence[int]) -> float:
    """Ideal length in bits of a sequence with these symbol counts under the adaptive (KT) model.

    The adaptive probability of a sequence depends only on its counts:
    ``prod_s Gamma(n_s + 1/2) / Gamma(1/2)`` over ``Gamma(n + k/2) / Gamma(k/2)``.

    Examples:
        >>> round(adaptive_code_length([1, 0]), 6)   # the first of two symbols: probability 1/2
        1.0
    """
    k, n = len(counts), sum(counts)
    log_probability = sum(math.lgamma(c + 0.5) - math.lgamma(0.5) for c in counts)
    log_probability -= math.lgamma(n + k / 2) - math.lgamma(k / 2)
    return -log_probability / math.log(2)
