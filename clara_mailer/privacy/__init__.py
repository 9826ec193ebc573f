"""GDPR: erase one person, export everything held about one address."""
