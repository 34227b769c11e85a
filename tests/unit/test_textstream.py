from __future__ import annotations

from backends.mock.model import EOS_ID
from backends.mock.textstream import TextStream


def push_all(stream: TextStream, text: str) -> str:
    out = ""
    for byte in text.encode():
        out += stream.push(byte)
        if stream.stopped:
            break
    return out


def test_plain_text_passes_through() -> None:
    stream = TextStream(())
    assert push_all(stream, "hello") + stream.flush() == "hello"
    assert not stream.stopped


def test_stop_string_is_cut_and_never_shown() -> None:
    stream = TextStream(["END"])
    out = push_all(stream, "abcENDxyz")
    assert out == "abc"
    assert stream.stopped


def test_possible_stop_prefix_is_held_then_released() -> None:
    stream = TextStream(["ENDING"])
    assert push_all(stream, "abEND") == "ab"  # "END" could start "ENDING"
    assert stream.push(ord("x")) == "ENDx"
    assert not stream.stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    stream = TextStream(["zz", "b"])
    assert push_all(stream, "abzz") == "a"


def test_eos_stops_and_flushes_held_text() -> None:
    stream = TextStream(["ab"])
    assert stream.push(ord("a")) == ""
    assert stream.push(EOS_ID) == "a"
    assert stream.stopped


def test_multibyte_characters_survive_the_hold_back() -> None:
    stream = TextStream(["é!"])
    assert push_all(stream, "café au lait") + stream.flush() == "café au lait"
