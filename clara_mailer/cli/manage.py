"""Recipient and segment management without a spreadsheet: recipients add/edit/remove,
segments create/rename/delete. Each parses, calls one ``Mailer`` method and says what
changed."""

from __future__ import annotations

from typing import Any

import click

from clara_mailer.cli.app import App, pass_app
from clara_mailer.cli.registry import recipients_group, segments_cmd


def _say(record: dict[str, Any], verb: str) -> None:
    click.echo(
        f"{record['email']}: {verb}; segments {record['segments'] or '(none)'}, "
        f"language {record['language']}, name {record['name'] or '(none)'}, "
        f"organisation {record['organisation'] or '(none)'}"
    )


@recipients_group.command("add")
@click.argument("address")
@click.option(
    "--segment", "segments", multiple=True, required=True, metavar="SLUG",
    help="A segment it belongs to. Repeatable.",
)  # fmt: skip
@click.option("--name", default="", help="A person or department.")
@click.option("--organisation", default="", help="The organisation.")
@click.option("--language", type=click.Choice(["es", "en"]), default="es", show_default=True)
@click.option(
    "--source", default="",
    help="Where the address comes from (printed in the footer of every message).",
)  # fmt: skip
@pass_app
def recipients_add(
    app: App,
    address: str,
    segments: tuple[str, ...],
    name: str,
    organisation: str,
    language: str,
    source: str,
) -> None:
    """Add ADDRESS to the registry. An opted-out or erased address is refused.

    Example: clara-mail recipients add ana@ejemplo.example --name "Ana Pérez" --organisation "Policía Local" --segment local-police --language es
    """
    record = app.mailer.add_recipient(
        address, segments=segments, name=name, organisation=organisation,
        language=language, consent_source=source,
    )  # fmt: skip
    _say(record, "added")


@recipients_group.command("edit")
@click.argument("address")
@click.option("--name", help='New name ("" to clear it).')
@click.option("--organisation", help='New organisation ("" to clear it).')
@click.option("--language", type=click.Choice(["es", "en"]))
@click.option("--segment", "add_segments", multiple=True, metavar="SLUG", help="Add to segment.")
@click.option(
    "--remove-segment", "remove_segments", multiple=True, metavar="SLUG",
    help="Take out of segment. Repeatable.",
)  # fmt: skip
@pass_app
def recipients_edit(
    app: App,
    address: str,
    name: str | None,
    organisation: str | None,
    language: str | None,
    add_segments: tuple[str, ...],
    remove_segments: tuple[str, ...],
) -> None:
    """Change the name, organisation, language or segments of ADDRESS.

    Example: clara-mail recipients edit ana@ejemplo.example --organisation "Policía Municipal" --segment media
    """
    record = app.mailer.edit_recipient(
        address, name=name, organisation=organisation, language=language,
        add_segments=add_segments, remove_segments=remove_segments,
    )  # fmt: skip
    _say(record, "changed")


@recipients_group.command("remove")
@click.argument("address")
@pass_app
def recipients_remove(app: App, address: str) -> None:
    """Take ADDRESS out of the registry (not an erasure).

    It leaves every segment, so no campaign reaches it. Its opt-outs stay as they are
    (a later import still refuses an opted-out address) and its delivery history is
    kept: when the delivery log refers to it, its profile is kept for the log. To erase
    everything about a person (GDPR), use `recipients erase`.

    Example: clara-mail recipients remove ana@ejemplo.example
    """
    done = app.mailer.remove_recipient(address)
    if done.deleted:
        click.echo(f"{done.address}: removed from the registry ({done.segments} segment(s)).")
    else:
        click.echo(
            f"{done.address}: taken out of its {done.segments} segment(s); its profile is kept "
            f"because {done.deliveries} delivery row(s) refer to it (to erase it: "
            f"clara-mail recipients erase {done.address})."
        )


@segments_cmd.command("create")
@click.argument("slug")
@click.option("--name", default="", help="What the segment is, in words.")
@pass_app
def segments_create(app: App, slug: str, name: str) -> None:
    """Create segment SLUG (lowercase letters, digits, -).

    Example: clara-mail segments create press-offices --name "Press offices"
    """
    row = app.mailer.create_segment(slug, name)
    click.echo(f"segment {row['slug']} created ({row['name']})")


@segments_cmd.command("rename")
@click.argument("slug")
@click.argument("new_slug", required=False)
@click.option("--name", help="A new name in words.")
@pass_app
def segments_rename(app: App, slug: str, new_slug: str | None, name: str | None) -> None:
    """Rename segment SLUG to NEW_SLUG and/or give it a new --name.

    Deliveries already made keep the segment they were sent under.

    Example: clara-mail segments rename media press --name "Press offices"
    """
    if new_slug is None and name is None:
        raise click.UsageError("give a NEW_SLUG, a --name, or both")
    row = app.mailer.rename_segment(slug, new_slug, name)
    click.echo(f"segment {slug} is now {row['slug']} ({row['name']}, {row['members']} member(s))")


@segments_cmd.command("delete")
@click.argument("slug")
@click.option("--force", is_flag=True, help="Delete it even with members.")
@pass_app
def segments_delete(app: App, slug: str, force: bool) -> None:
    """Delete segment SLUG. One with members is refused unless --force.

    The recipients stay in the registry and in their other segments; deliveries are
    never touched.

    Example: clara-mail segments delete press-offices --force
    """
    dropped = app.mailer.delete_segment(slug, force=force)
    click.echo(f"segment {slug} deleted ({dropped} membership(s) dropped)")
