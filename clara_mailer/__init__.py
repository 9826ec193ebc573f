"""clara-mail: dissemination campaigns and newsletters for the CLARA project."""

__version__ = "0.1.0"
