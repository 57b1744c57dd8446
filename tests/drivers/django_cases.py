"""Django's ORM on psycopg, one process per run: configured in-process, migrated, then CRUD.

Usage: python tests/drivers/django_cases.py LABEL=HOST:PORT/DATABASE ...
Each label is a database alias; `migrate` (auth and contenttypes' real migrations) runs on each,
then a model's table is created with the schema editor, filled, queried, updated, deleted, a
transaction.atomic() block rolls back on an IntegrityError, and the table is dropped. Prints
{label: [observation, ...]} on stdout. Run in its own process: Django is configured once per process.
"""

from __future__ import annotations

import functools
import io
import json
import sys
from typing import Any

import django
from django.conf import settings


def configure(targets: dict[str, tuple[str, int, str]]) -> None:
    databases = {label: {"ENGINE": "django.db.backends.postgresql", "HOST": host, "PORT": port, "NAME": name,
                         "USER": "postgres", "CONN_MAX_AGE": 0}
                 for label, (host, port, name) in targets.items()}
    databases["default"] = next(iter(databases.values()))
    settings.configure(DATABASES=databases, USE_TZ=True, DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
                       INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"])
    django.setup()


@functools.cache
def note_model() -> Any:
    """The test model, defined once Django is set up (a model class registers itself)."""
    from django.db import models

    class Note(models.Model):  # type: ignore[misc]  # django ships no type hints
        title = models.CharField(max_length=40, unique=True)
        score = models.IntegerField(default=0)

        class Meta:
            app_label = "drv"
            db_table = "drv_django_note"

    return Note


def work(alias: str) -> list[Any]:
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import IntegrityError, connections, models, transaction

    Note = note_model()
    out: list[Any] = []
    call_command("migrate", database=alias, verbosity=0, stdout=io.StringIO())
    conn = connections[alias]
    with conn.schema_editor() as editor:
        editor.execute("DROP TABLE IF EXISTS drv_django_note")
        editor.create_model(Note)
    try:
        notes = Note.objects.using(alias)
        notes.bulk_create([Note(title=f"n{i}", score=i) for i in range(20)])
        for i in range(7):  # re-executed: psycopg prepares from the 6th execution
            titles = notes.filter(score__gte=i * 3).order_by("score").values_list("title", flat=True)
            out.append(list(titles[:3]))
        out.append(notes.filter(score__lt=5).update(score=100))
        out.append(notes.filter(score=100).delete()[0])
        try:
            with transaction.atomic(using=alias):
                notes.create(title="fresh", score=1)
                notes.create(title="n10", score=2)
        except IntegrityError as err:
            out.append(("integrity", getattr(err.__cause__, "sqlstate", None)))
        out.append(notes.filter(title="fresh").exists())
        with transaction.atomic(using=alias):
            note = notes.select_for_update().get(title="n7")
            note.score = 70
            note.save(using=alias)
        out.append(notes.get(title="n7").score)
        out.append(list(notes.aggregate(total=models.Sum("score"), n=models.Count("id")).items()))
        User.objects.db_manager(alias).create_user("drv_user", password="x")
        out.append(User.objects.using(alias).filter(username="drv_user").count())
        User.objects.using(alias).filter(username="drv_user").delete()
    finally:
        with conn.schema_editor() as editor:
            editor.delete_model(Note)
        conn.close()
    return out


def main() -> None:
    targets: dict[str, tuple[str, int, str]] = {}
    for arg in sys.argv[1:]:
        label, address = arg.split("=", 1)
        hostport, name = address.split("/", 1)
        host, port = hostport.rsplit(":", 1)
        targets[label] = (host, int(port), name)
    configure(targets)
    print(json.dumps({label: work(label) for label in targets}))


if __name__ == "__main__":
    main()
