"""Length-prefixed framing: table tests over byte literals."""

import pytest

from protocol import RemoteProtocolError
from protocol.errors import LocalProtocolError
from protocol.framing import FrameDecoder, encode_frame


def frames_of(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"\x00\x00\x00\x01a", [b"a"]),
        (b"\x00\x00\x00\x03abc\x00\x00\x00\x02de", [b"abc", b"de"]),
        (b"\x00\x00\x00\x03abc\x00\x00", [b"abc"]),  # second header incomplete
        (b"\x00\x00\x00\x05abc", []),  # body incomplete
        (b"", []),
    ],
)
def test_decoder_yields_whole_frames_only(stream: bytes, expected: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.feed(stream)
    assert frames_of(decoder) == expected


def test_decoder_reassembles_frames_split_at_every_boundary() -> None:
    stream = b"\x00\x00\x00\x03abc\x00\x00\x00\x01d\x00\x00\x00\x04efgh"
    for cut in range(len(stream) + 1):
        for second_cut in range(cut, len(stream) + 1):
            decoder = FrameDecoder(max_frame_size=10)
            got = []
            for chunk in (stream[:cut], stream[cut:second_cut], stream[second_cut:]):
                if chunk:
                    decoder.feed(chunk)
                got += frames_of(decoder)
            assert got == [b"abc", b"d", b"efgh"], (cut, second_cut)


def test_decoder_accepts_one_byte_at_a_time() -> None:
    stream = encode_frame(b"x" * 300, 1000) + encode_frame(b"y", 1000)
    decoder = FrameDecoder(max_frame_size=1000)
    got = []
    for byte in stream:
        decoder.feed(bytes([byte]))
        got += frames_of(decoder)
    assert got == [b"x" * 300, b"y"]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"\x00\x00\x00\x00", "below the minimum"),
        (b"\x00\x00\x00\x03", "below the minimum"),  # tiny: under min_frame_size=8
        (b"\x00\x00\x01\x01", "exceeds the cap"),  # 257 > 256
        (b"\x7f\xff\xff\xff", "exceeds the cap"),
        (b"\xff\xff\xff\xff", "exceeds the cap"),
    ],
)
def test_decoder_rejects_bad_length_as_soon_as_header_arrives(header: bytes, message: str) -> None:
    decoder = FrameDecoder(max_frame_size=256, min_frame_size=8)
    # No body follows: the length alone must be refused, before anything is buffered for it.
    with pytest.raises(RemoteProtocolError, match=message):
        decoder.feed(header)


def test_over_cap_frame_is_refused_before_its_body_is_buffered() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"\x00\x10\x00\x00")  # 1 MiB announced, no body sent
    assert decoder.buffered == 4


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"\x00\x00", "into a length prefix"),
        (b"\x00\x00\x00\x04ab", "into a 4-byte frame"),
    ],
)
def test_end_of_stream_mid_frame_is_an_error(stream: bytes, message: str) -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.feed(stream)
    decoder.feed(b"")
    with pytest.raises(RemoteProtocolError, match=message):
        frames_of(decoder)


def test_end_of_stream_between_frames_is_clean() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.feed(b"\x00\x00\x00\x01a")
    decoder.feed(b"")
    assert frames_of(decoder) == [b"a"]
    assert decoder.at_eof


def test_data_after_end_of_stream_is_a_local_error() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.feed(b"")
    with pytest.raises(LocalProtocolError):
        decoder.feed(b"late")


@pytest.mark.parametrize("payload", [b"", b"x" * 11])
def test_encoder_refuses_empty_or_over_cap_frames(payload: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(payload, max_frame_size=10)


def test_encoder_writes_big_endian_length() -> None:
    assert encode_frame(b"\x01" * 258, 1000)[:4] == b"\x00\x00\x01\x02"


@pytest.mark.parametrize(("low", "high"), [(0, 10), (11, 10), (1, 1 << 31)])
def test_decoder_bounds_are_validated(low: int, high: int) -> None:
    with pytest.raises(ValueError, match="frame bounds"):
        FrameDecoder(max_frame_size=high, min_frame_size=low)
