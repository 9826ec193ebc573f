"""``clara-mail archive build DIR``: the public archive as static files for a website."""

from __future__ import annotations

from pathlib import Path

import click

from clara_mailer.cli.app import App, main, pass_app


@main.group("archive")
def archive_group() -> None:
    """The public archive of the campaigns sent (also served by `clara-mail serve`).

    \b
    Example:
      clara-mail archive build site/archive
    """


@archive_group.command("build")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@pass_app
def build_cmd(app: App, directory: Path) -> None:
    """Write the archive to DIRECTORY: index.html and SLUG/LANG.html per campaign sent.

    \b
    The same pages as /archive of `clara-mail serve`, without any personal data: no
    name, organisation, address or token. Existing files of the same names are replaced;
    nothing else in DIRECTORY is touched.

    \b
    Example:
      clara-mail archive build site/archive
    """
    mailer = app.mailer
    entries = mailer.archive()
    pages: dict[Path, str] = {Path("index.html"): mailer.archive_index(static=True)}
    for entry in entries:
        for language in entry["languages"]:
            page = mailer.archive_page(entry["slug"], language)
            pages[Path(entry["slug"]) / f"{language}.html"] = page
    for relative, page in pages.items():
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        partial.write_text(page, encoding="utf-8")
        partial.replace(target)
    click.echo(
        f"Wrote {len(pages)} page(s) to {directory}: index.html and {len(entries)} campaign(s) sent"
    )
