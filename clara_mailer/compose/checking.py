"""A send's check in a process of its own.

Before a send, every variant of the campaign is rendered and checked, and its CSS
inlined (premailer, with lxml and cssutils): work done once, whose imports and garbage
(~9 MB) a sending process would otherwise keep to its end. ``CheckRun.start`` runs
``check_and_prepare`` in a short-lived child (a fresh interpreter, not a fork of this
one), which hands back the problems and every prepared variant the send can meet; the
sending process adopts those variants (``Renderer.adopt``) and never imports premailer.
``clara-mail send`` runs the check first thing and waits for it before it loads its
database layer: the child (~43 MB at its peak) and the sending process (~18 MB by
then) together stay under what the sending process later needs alone.

The request goes to the child's standard input and the answer comes back in a file (its
standard output), pickled: the child is this program, started by it, reading nothing
else. It gets the parent's module path first, so both run the same code. The library's ``plan.checked_campaign`` checks in its
own process when it is given no ``CheckRun`` (the web app, scheduled sends, tests).
"""

from __future__ import annotations

import itertools
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from clara_mailer.core.errors import MailerError
from clara_mailer.core.settings import Settings

if TYPE_CHECKING:
    from clara_mailer.compose.render import PreparedVariants

#: What the child runs: read the module path, then the request; write the answer.
_CHILD = (
    "import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
    "from clara_mailer.compose.checking import _child_main; _child_main()"
)


def check_and_prepare(
    settings: Settings, slug: str, segments: Sequence[str]
) -> tuple[list[str], PreparedVariants]:
    """The check of ``slug`` for ``segments`` (its default segments when empty), and the
    variants a send to them can meet, prepared: every language and segment, with and
    without each optional field. A variant the check did not cover and that fails to
    render is left out: the sender meets the same error for those recipients alone."""
    from clara_mailer.compose.campaigns import load_campaign
    from clara_mailer.compose.render import Renderer, check_campaign, for_sending
    from clara_mailer.core.tokens import TokenSigner

    defn = load_campaign(settings, slug)
    chosen = tuple(segments) or defn.default_segments
    # Variants hold no token and no id (those are per recipient): any key will do.
    renderer = Renderer(defn, settings, TokenSigner("check-only: never sent"), 0)
    problems = check_campaign(settings, slug, renderer, chosen)
    if not problems:
        for language, segment in itertools.product(defn.languages, chosen):
            for presence in itertools.product((True, False), repeat=3):
                try:
                    renderer.variant(language, segment, *presence)
                except MailerError:
                    continue
    return problems, for_sending(renderer.prepared())


class CheckRun:
    """``check_and_prepare`` running in a child process; ``result`` waits for it.

    The child writes its answer and its stderr to files, not pipes: it never waits on
    this process, and it has exited (its memory given back) before this one reads the
    answer and loads the variants."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        slug: str,
        segments: tuple[str, ...],
        output: IO[bytes],
        errors: IO[bytes],
    ) -> None:
        self._process, self._output, self._errors = process, output, errors
        self.slug, self.segments = slug, segments  # as asked (none: the campaign's own)
        self._answer: tuple[str, Any] | None = None  # ("ok", result) or ("error", exc)

    @classmethod
    def start(cls, settings: Settings, slug: str, segments: Sequence[str]) -> CheckRun:
        flags = [f"-W{option}" for option in sys.warnoptions]
        output = tempfile.TemporaryFile()  # noqa: SIM115  # closed once answered
        errors = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            process = subprocess.Popen(
                [sys.executable, *flags, "-c", _CHILD],
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=errors,
            )
        except OSError as exc:
            output.close()
            errors.close()
            raise MailerError(
                f"cannot start the check of {slug!r} ({sys.executable}): {exc.strerror or exc}"
            ) from None
        assert process.stdin is not None
        try:  # small, and read by the child at once: this never waits long
            pickle.dump(list(sys.path), process.stdin)
            pickle.dump((settings, slug, tuple(segments)), process.stdin)
        except OSError:
            pass  # the child died at start: ``wait`` says why
        finally:
            process.stdin.close()
        return cls(process, slug, tuple(segments), output, errors)

    def wait(self) -> None:
        """Wait for the child to end and read its answer; what it says waits for
        ``result``."""
        if self._answer is not None:
            return
        self._process.wait()
        try:
            self._output.seek(0)
            self._answer = pickle.load(self._output)
        except Exception:  # no answer: say what the child said
            self._errors.seek(0)
            said = self._errors.read().decode("utf-8", "replace").strip().splitlines()
            why = said[-1][:300] if said else f"exit status {self._process.returncode}"
            self._answer = ("error", MailerError(f"the check of {self.slug!r} stopped: {why}"))
        finally:
            self._output.close()
            self._errors.close()

    def result(self) -> tuple[list[str], PreparedVariants]:
        """The problems and the prepared variants; raises what the check raised, or a
        ``MailerError`` when the child did not answer."""
        self.wait()
        assert self._answer is not None
        status, payload = self._answer
        if status == "error":
            raise payload
        result: tuple[list[str], PreparedVariants] = payload
        return result


def _child_main() -> None:
    request: tuple[Settings, str, tuple[str, ...]] = pickle.load(sys.stdin.buffer)
    answer: tuple[str, Any]
    try:
        answer = ("ok", check_and_prepare(*request))
    except MailerError as exc:
        try:
            pickle.dumps(exc)
            answer = ("error", exc)
        except Exception:  # an error that does not pickle: its words
            answer = ("error", MailerError(str(exc)))
    sys.stdout.buffer.write(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.flush()
