"""Where a search's Optuna study lives: the SQLite file `study.db` in the experiment folder,
or, with `--study-storage URL`, a database that every driver and tool can reach
(PostgreSQL, MySQL: any SQLAlchemy URL Optuna's RDBStorage takes).

    url = study_url(exp_dir, meta)      # what the searcher, report, dashboard and warm start open
    check_storage(url, "search-1", fresh=True)

The URL is kept in tune_age.json, so it may not hold a password: libpq's PGPASSWORD or
~/.pgpass (MySQL: its option files) give it to every reader instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError

STUDY_FILE = "study.db"
DRIVERS = {"postgresql": "pip install 'tune_age[postgres]' (psycopg 3)", "mysql": "its driver (PyMySQL, mysqlclient)"}


def file_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def study_url(exp_dir: str | Path, meta: dict[str, Any] | None) -> str:
    """The study of the experiment in `exp_dir` (its tune_age.json is `meta`)."""
    stored = ((meta or {}).get("search") or {}).get("study_storage")
    return stored or file_url(Path(exp_dir) / STUDY_FILE)


def describe(url: str) -> str:
    """The URL for people, without a password (there should be none)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def check_storage(url: str, name: str, fresh: bool) -> None:
    """A ConfigError naming the URL when it is not a database URL, holds a password, its
    driver is missing, the server does not answer, or (`fresh`) a study called `name` is
    already there: a new search would add its trials to another search's."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    flag = f"--study-storage {url}"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"{flag}: not a database URL; give one such as "
                          "postgresql://USER@HOST:5432/DB (the password in PGPASSWORD or ~/.pgpass)") from None
    flag = f"--study-storage {describe(url)}"
    if parsed.password:
        raise ConfigError(f"{flag}: the URL holds a password, and tune_age.json keeps the URL; give it by "
                          "PGPASSWORD or ~/.pgpass instead")
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except ImportError as exc:  # Optuna's wording for it
        need = DRIVERS.get(parsed.get_backend_name(), "its SQLAlchemy driver")
        missing = getattr(exc.__cause__, "name", None) or "its module"
        raise ConfigError(f"{flag}: the database driver ({missing}) is not installed; {need}") from None
    except Exception as exc:  # refused connection, unknown database, failed authentication
        why = " ".join(str(getattr(exc, "orig", None) or exc).split())[:200]
        raise ConfigError(f"{flag}: the database could not be opened ({why})") from None
    try:
        names = {s.study_name for s in storage.get_all_studies()}
    finally:
        storage.remove_session()
    if fresh and name in names:
        raise ConfigError(f"{flag}: a study named {name!r} is already there (another search's); give "
                          "another --name, or --resume that search")
    if not fresh and name not in names:
        raise ConfigError(f"{flag}: no study named {name!r} is there; resume with the --study-storage the "
                          "search began with")
