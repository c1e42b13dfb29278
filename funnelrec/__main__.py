"""``python -m funnelrec`` runs the CLI (also what ``torchrun -m funnelrec`` starts)."""

from funnelrec.cli import app

app()
