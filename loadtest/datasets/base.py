"""What every dataset produces: sessions of one or more turns, built up front."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Turn:
    """One request's new user text and how many tokens to ask for."""

    text: str
    output_len: int


@dataclass(frozen=True)
class Session:
    """A conversation: turn k is sent after turn k-1 answered, carrying the earlier turns.

    Single-turn datasets make one-turn sessions. `system` is the shared prefix of a
    shared-prefix group (a system message in chat, the start of the prompt otherwise).
    """

    session_id: int
    turns: tuple[Turn, ...]
    system: str | None = None
    group: int | None = None
    source_id: str | None = None


def take_requests(sessions: list[Session], num_requests: int) -> list[Session]:
    """The first sessions holding `num_requests` turns in all (the last one cut short)."""
    taken: list[Session] = []
    left = num_requests
    for session in sessions:
        if left <= 0:
            break
        turns = session.turns[:left]
        taken.append(Session(session.session_id, turns, session.system, session.group,
                             session.source_id))
        left -= len(turns)
    return taken
