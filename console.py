"""What the two interactive consoles share: prompts that a Ctrl-C, Esc or Ctrl-D
cancels the way a shell does, and the progress of running transfers in status
rows that prompt_toolkit paints with the prompt (just above it), so that nothing
else on the screen is ever mixed with a bar.

Without a terminal (stdin or stdout not a tty) a Console is plain input() and the
sessions keep their own progress (tqdm on stderr for a tty, nothing otherwise)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time

import session
from protocol import neutralise

REDRAW_EVERY = 0.25  # seconds between status line redraws while bytes move


class Cancelled(Exception):
    """the user cancelled this input (Ctrl-C, Esc or Ctrl-D at a sub-prompt)"""


# --- running transfers --------------------------------------------------------------
class Bar:
    """One transfer's progress, as session.Events.progress hands it out: update()
    from the thread that moves the bytes, close() when it ends (either way).  A
    batch's bar (files > 0) also counts the files whose outcome is known."""

    def __init__(self, owner: Transfers, total: int, desc: str, files: int = 0) -> None:
        self.owner, self.total, self.desc = owner, total, desc
        self.done = 0
        self.files, self.files_done = files, 0
        self.started = time.monotonic()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int) -> None:
        self.done += n
        self.owner.changed(quietly=True)

    def file_done(self, unsent: int = 0) -> None:
        self.files_done += 1
        self.total -= unsent  # a file refused or cut short: its bytes will not move
        self.owner.changed()

    def close(self) -> None:
        self.owner.remove(self)

    def line(self, width: int | None = None) -> str:
        """The row; within `width` columns the name gives way first, so the
        figures (and the speed and time left after them) stay in view."""
        pct = min(self.done * 100 // self.total, 100) if self.total > 0 else 100
        elapsed = time.monotonic() - self.started
        files = f" {self.files_done}/{self.files}" if self.files else ""  # done of all
        rate = ""
        if elapsed > 0.5 and self.done:
            speed = self.done / elapsed
            rate = f"  {session.human_size(speed)}/s  {eta(max(self.total - self.done, 0) / speed)}"
        figures = (f"{files}  {pct:3d}%  {session.human_size(self.done)} of "
                   f"{session.human_size(self.total)}{rate}")
        desc = self.desc
        if width is not None and len(desc) + len(figures) > width - 1:
            keep = max(width - 1 - len(figures), 12)  # "sending " and a few letters at least
            desc = desc[: keep - 1] + "…" if keep < len(desc) else desc
        return desc + figures


def eta(seconds: float) -> str:
    """Time left, as people read it: "12 s left", "3:05 left", "1:02:03 left"."""
    s = round(seconds)
    if s < 60:
        return f"{s} s left"
    m, s = divmod(s, 60)
    return f"{m}:{s:02d} left" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d} left"


class Transfers:
    """The running transfers of every connection, for the status line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bars: list[Bar] = []
        self._redrawn = 0.0
        self.on_change = lambda: None  # set by the Console: redraw the status line

    def progress(self, total: int, desc: str, files: int = 0) -> Bar:
        bar = Bar(self, total, neutralise(desc), files)
        with self._lock:
            self._bars.append(bar)
        self.changed()
        return bar

    def remove(self, bar: Bar) -> None:
        with self._lock:
            if bar not in self._bars:
                return
            self._bars.remove(bar)
        self.changed()

    def changed(self, quietly: bool = False) -> None:
        now = time.monotonic()
        if quietly and now - self._redrawn < REDRAW_EVERY:
            return
        self._redrawn = now
        self.on_change()

    def status(self, width: int) -> str:
        """One line per transfer, each cut to the terminal's width; "" when idle."""
        with self._lock:
            lines = [bar.line(width) for bar in self._bars]
        return "\n".join(line[: max(width - 1, 1)] for line in lines)


class _Router:
    """sys.stdout/sys.stderr under a console.  Other threads (incoming lines) go
    through prompt_toolkit's StdoutProxy, which prints above a running prompt.  The
    main thread prints only between prompts (lists, results): its lines are written
    at once, so they are on the screen before the next prompt is painted rather
    than pushed in by the proxy's thread a moment later, possibly onto that prompt.
    They go out a whole line at a time: print() writes a line and its newline
    separately, and the proxy's thread could put its line between the two."""

    def __init__(self, proxy, real, busy) -> None:
        self._proxy, self._real, self._busy = proxy, real, busy
        self._partial = ""  # the main thread's text after its last newline

    def _target(self):
        if threading.current_thread() is threading.main_thread() and not self._busy():
            return self._real
        return self._proxy

    def write(self, text: str) -> int:
        target = self._target()
        if target is not self._real:
            return target.write(text)
        lines, newline, self._partial = (self._partial + text).rpartition("\n")
        if newline:
            self._real.write(lines + newline)
            self._real.flush()
        return len(text)

    def flush(self) -> None:
        target = self._target()
        if target is self._real and self._partial:  # print(..., end="", flush=True)
            self._real.write(self._partial)
            self._partial = ""
        target.flush()

    def isatty(self) -> bool:
        return self._real.isatty()

    def fileno(self) -> int:
        return self._real.fileno()

    @property
    def encoding(self) -> str:
        return self._real.encoding


# --- prompts ----------------------------------------------------------------------------
class Console:
    """Prompts for one console.  prompt() returns what was typed; at a sub-prompt
    Ctrl-C, Esc and Ctrl-D raise Cancelled (back to the menu); at the menu Ctrl-C
    raises KeyboardInterrupt and Ctrl-D returns "quit".  SIGTERM (or a SIGINT sent
    with kill) always raises KeyboardInterrupt: see session.Interrupt."""

    def __init__(self, interrupt: session.Interrupt, transfers: Transfers) -> None:
        self.interrupt = interrupt
        self.transfers = transfers
        self.tty = sys.stdin.isatty()
        self._ps = None
        self._busy = None  # the Application shown while the main thread sends
        self._sub = False
        if self.tty:
            self._ps = self._make_session()
            transfers.on_change = self._redraw

    def _make_session(self):
        from prompt_toolkit import PromptSession  # noqa: PLC0415
        from prompt_toolkit.filters import Condition  # noqa: PLC0415
        from prompt_toolkit.key_binding import KeyBindings  # noqa: PLC0415

        keys = KeyBindings()

        @keys.add("escape", filter=Condition(lambda: self._sub))
        def _(event) -> None:
            event.app.exit(exception=Cancelled())

        return PromptSession(key_bindings=keys)

    @contextlib.contextmanager
    def patched_stdout(self):
        """prompt_toolkit's patch_stdout(raw=True), with the main thread's own lines
        written directly (see _Router)."""
        from prompt_toolkit.patch_stdout import StdoutProxy  # noqa: PLC0415

        with StdoutProxy(raw=True) as proxy:
            saved = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = _Router(proxy, saved[0], lambda: self._busy is not None)
            try:
                yield
            finally:
                sys.stdout, sys.stderr = saved

    # the status line ------------------------------------------------------------------
    def _status(self):
        from prompt_toolkit.application import get_app  # noqa: PLC0415

        return self.transfers.status(get_app().output.get_size().columns)

    def _with_status(self, message: str):
        """The prompt's message: the status rows above the prompt while transfers run.
        The last paint of an answered prompt (is_done) has the prompt only, so that no
        progress stays in the scrolling output.  (A bottom toolbar would need the
        terminal to answer cursor position requests, which not every terminal does.)"""
        from prompt_toolkit.application import get_app  # noqa: PLC0415

        def paint() -> str:
            status = "" if get_app().is_done else self._status()
            return f"{status}\n{message}" if status else message
        return paint

    def _redraw(self) -> None:
        for app in (self._ps.app if self._ps else None, self._busy):
            if app is not None and app.is_running:
                app.invalidate()  # thread-safe

    # asking ----------------------------------------------------------------------------------
    def prompt(self, message: str, *, menu: bool = False, closed=None) -> str:
        """One line from the user.  `closed` (an Event) ends a prompt when it is set."""
        if not self.tty:
            return self._plain(message, menu)
        self._sub = not menu
        try:
            with self.interrupt.prompting():
                return self._ps.prompt(self._with_status(message),
                                       pre_run=self._leave_if(closed))
        except KeyboardInterrupt:
            if self.interrupt.event.is_set() or menu:
                raise  # SIGTERM, or Ctrl-C at the menu: the caller quits
            raise Cancelled() from None
        except EOFError:
            if menu:
                return "quit"
            raise Cancelled() from None

    def _plain(self, message: str, menu: bool) -> str:
        try:
            with self.interrupt.prompting():
                return input(message)
        except EOFError:
            print()  # the answer goes on its own line, not after the question
            if menu:
                return "quit"
            raise Cancelled() from None

    def _leave_if(self, closed):
        """pre_run for a prompt that a hang-up (closed set) must end: a watcher thread
        exits the running prompt, and a prompt started after the hang-up exits at once."""
        if closed is None:
            return None
        ps = self._ps

        def leave() -> None:
            if closed.is_set() and ps.app.is_running and not ps.app.future.done():
                ps.app.exit(result="")

        def watch() -> None:
            closed.wait()
            app = ps.app
            if app.is_running and app.loop is not None:
                app.loop.call_soon_threadsafe(leave)

        threading.Thread(target=watch, daemon=True).start()
        return leave

    # sending while the status line shows the progress ---------------------------------------
    def busy(self, work):
        """Run work() (a send) here, in the main thread, while a status-only
        application paints its progress from a thread of its own: signals are
        handled exactly as without it (session.Interrupt), and Ctrl-C, a key in raw
        mode, sets the same flag, so the send stops between records and the program
        says goodbye."""
        if not self.tty:
            return work()
        from prompt_toolkit.application import Application  # noqa: PLC0415
        from prompt_toolkit.key_binding import KeyBindings  # noqa: PLC0415
        from prompt_toolkit.layout import Layout, Window  # noqa: PLC0415
        from prompt_toolkit.layout.controls import FormattedTextControl  # noqa: PLC0415

        keys = KeyBindings()

        @keys.add("c-c")
        def _(event) -> None:
            self.interrupt.event.set()  # as SIGINT: see session.Interrupt

        @keys.add("<any>")
        def _(event) -> None:
            pass  # typing waits for the prompt

        app = Application(layout=Layout(Window(FormattedTextControl(
            lambda: self._status() or "..."), style="class:bottom-toolbar")),
            key_bindings=keys, erase_when_done=True,
            # the prompt's own terminal objects: one reader of stdin, one raw-mode owner
            input=self._ps.input, output=self._ps.output)
        finished = threading.Event()

        def leave() -> None:
            if finished.is_set() and app.is_running and not app.future.done():
                app.exit()

        painter = threading.Thread(target=app.run, daemon=True, name="status",
                                   kwargs={"pre_run": leave, "handle_sigint": False})
        self._busy = app
        painter.start()
        try:
            return work()
        finally:
            finished.set()
            loop = app.loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # its loop already closed
                    loop.call_soon_threadsafe(leave)
            painter.join()
            self._busy = None
