"""Who may use the dashboard (users with argon2 password hashes) and what they did (audit)."""
