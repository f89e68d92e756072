"""``python manage.py benchmark <name> [flags]``: prints figures as JSON.

Each benchmark lives beside the code it measures, in a module exposing ``add_arguments(parser)``
and ``run(options, stdout) -> dict``.
"""

import importlib
import json

from django.core.management.base import BaseCommand, CommandError

BENCHMARKS = {
    "booking": "marketplace.reservations.benchmark",
    "scheduler": "scheduler.benchmark",
}


class Command(BaseCommand):
    help = "Run a benchmark and print its figures as JSON: " + ", ".join(BENCHMARKS)

    def add_arguments(self, parser):
        subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
        for name, module_path in BENCHMARKS.items():
            try:
                module = importlib.import_module(module_path)
            except ModuleNotFoundError:
                continue
            summary = (module.__doc__ or "").strip().splitlines()
            module.add_arguments(subparsers.add_parser(name, help=summary[0] if summary else ""))

    def handle(self, *args, **options):
        name = options["benchmark"]
        try:
            module = importlib.import_module(BENCHMARKS[name])
        except (KeyError, ModuleNotFoundError) as exc:
            raise CommandError(f"No benchmark named {name!r}.") from exc
        figures = module.run(options, self.stdout)
        self.stdout.write(json.dumps(figures, indent=2, default=str))
