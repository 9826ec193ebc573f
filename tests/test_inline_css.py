"""premailer, as clara-mail runs it, keeps the rules made of a stylesheet (and the text of
those left in ``<style>``) from one document to the next (``compose.render.SharedRules``):
every variant of every shipped campaign must come out byte for byte as premailer itself
inlines it."""

from __future__ import annotations

from premailer import Premailer

from clara_mailer.compose.campaigns import list_campaigns
from clara_mailer.compose.render import (
    _SENTINELS,
    PREMAILER_OPTIONS,
    Renderer,
    _premailer,
    inline_css,
)
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.core.vocabulary import STANDARD_SEGMENTS


def test_inlining_with_shared_rules_is_premailers_own(settings: Settings) -> None:
    assert _premailer() is not Premailer and issubclass(_premailer(), Premailer)
    signer = TokenSigner("x" * 32)
    documents = 0
    for defn in list_campaigns(settings):
        slug = defn.slug
        renderer = Renderer(defn, settings, signer, 1)
        for language in defn.languages:
            template = renderer.env.get_template(defn.template_file(language).name)
            for segment in ("", *STANDARD_SEGMENTS):
                for values in (_SENTINELS, ("", "", *_SENTINELS[2:5], "")):
                    document = template.render(renderer._context(language, segment, values))
                    # Twice with the shared rules (the second from the kept rules).
                    first, again = inline_css(document), inline_css(document)
                    plain = str(Premailer(document, **PREMAILER_OPTIONS).transform())
                    assert first == again == plain, (slug, language, segment)
                    assert first.count("style=") > 10
                    documents += 1
    assert documents >= 3 * 2 * 6 * 2
