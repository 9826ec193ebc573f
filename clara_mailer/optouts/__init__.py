"""Opt-outs: the suppression list (keyed hashes) and what the unsubscribe and RSVP links do."""
