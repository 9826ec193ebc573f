"""The audience's side: subscribing through the web form (double opt-in, with proof of
consent) and sends scheduled for a later time.

- ``subscribe``: the sealed confirmation link, the confirmation message, and what a
  confirmation records (the recipient, a consent record, lifted suppressions);
- ``schedule``: ``send --at``, cancelling, and the runners that start each due send once.
"""
