from recforge.cli import app

app()
