"""View-like functions: what a request handler does, minus HTTP."""

from django.db import transaction

from pulse_demo.models import Note
from pulse_demo.tasks import add, note_length


class Abort(Exception):
    pass


def create_note(text):
    """Writes a row and enqueues its task in one transaction."""
    with transaction.atomic():
        note = Note.objects.create(text=text)
        result = note_length.enqueue(note.pk)
    return note, result


def create_note_then_fail(text, seen):
    """The transaction rolls back after the enqueue: the note and the job go."""
    try:
        with transaction.atomic():
            note = Note.objects.create(text=text)
            seen.append((note.pk, note_length.enqueue(note.pk)))
            raise Abort("rolled back on purpose")
    except Abort:
        pass


def add_on_commit(a, b, results, fail=False):
    """Django's documented way to enqueue after the commit."""
    try:
        with transaction.atomic():
            transaction.on_commit(lambda: results.append(add.enqueue(a, b)))
            if fail:
                raise Abort("rolled back on purpose")
    except Abort:
        pass
