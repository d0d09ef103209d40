import click

@click.group()
def cache():
    """Inspect and clean the dtool item cache."""
