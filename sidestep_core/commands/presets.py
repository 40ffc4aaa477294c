"""``sidestep presets``: list, show, save and delete training presets."""

from __future__ import annotations

import json

from ..config import RUN_ONLY_FIELDS, TrainConfig
from ._progress import EXIT_CODES_HELP, EXIT_OK, say


def register(sub, name):
    from .. import presets as P

    p = sub.add_parser(
        name,
        help="list, show, save and delete training presets",
        description="Presets are named training settings (never paths or devices). They are looked up in the "
        f"project folder ./{P.PROJECT_DIRNAME}/, then the user folder ({P.user_dir()}), then the built-in ones "
        f"({', '.join(P.BUILTIN)}). Use one with `sidestep train --preset NAME`.",
        epilog=EXIT_CODES_HELP,
    )
    actions = p.add_subparsers(dest="preset_action", metavar="ACTION")
    actions.add_parser("list", help="list every preset with its origin and description")
    show = actions.add_parser("show", help="print a preset's settings")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print the preset file as JSON")
    actions.add_parser("dirs", help="print the folders searched for presets")

    save = actions.add_parser(
        "save", help="save settings as a preset",
        description="Save a preset from a base preset (--from), a JSON config file (--config) and/or training "
        "options, later ones winning. Paths, devices and resume settings are never stored.")
    save.add_argument("name")
    save.add_argument("--from", dest="base", metavar="PRESET", help="start from this preset's settings")
    save.add_argument("--config", metavar="FILE", help="JSON settings file (e.g. a run's training_config.json "
                      "'config' object, or a plain TrainConfig mapping)")
    save.add_argument("--description", default="", help="one line shown by `presets list`")
    save.add_argument("--user", action="store_true", help="save in the user folder instead of the project folder")
    save.add_argument("--overwrite", action="store_true", help="replace an existing preset of that name")
    TrainConfig.add_arguments(save, skip=RUN_ONLY_FIELDS)

    delete = actions.add_parser("delete", help="delete a saved preset")
    delete.add_argument("name")
    where = delete.add_mutually_exclusive_group()
    where.add_argument("--user", dest="scope", action="store_const", const="user", help="only the user folder")
    where.add_argument("--project", dest="scope", action="store_const", const="project",
                       help="only the project folder")
    p.set_defaults(preset_action=None)
    p._sidestep_actions = actions  # for run() to print help
    return p


def _settings_from_config_file(path: str) -> dict:
    from ..presets import read_config_file

    return {k: v for k, v in read_config_file(path).items() if k not in RUN_ONLY_FIELDS}


def run(args) -> int:
    from .. import presets as P

    action = args.preset_action or "list"
    if action == "list":
        presets = P.all_presets()
        width = max(len(p.name) for p in presets)
        for pr in sorted(presets, key=lambda x: (x.scope != "builtin", x.name not in P.BUILTIN, x.name)):
            say(f"{pr.name:<{width}}  {pr.scope:<8} {pr.description}")
        return EXIT_OK
    if action == "dirs":
        say(f"project: {P.project_dir()}\nuser:    {P.user_dir()}")
        return EXIT_OK
    if action == "show":
        pr = P.get_preset(args.name)
        if args.json:
            say(json.dumps(pr.to_dict(), indent=2))
            return EXIT_OK
        say(f"{pr.name} ({pr.scope}{', ' + str(pr.path) if pr.path else ''})")
        if pr.description:
            say(pr.description)
        defaults = TrainConfig().to_dict(include_run=False)
        for k, v in pr.settings.items():
            mark = "" if defaults.get(k) != v else "  (default)"
            say(f"  {k} = {json.dumps(v)}{mark}")
        return EXIT_OK
    if action == "save":
        settings: dict = {}
        if args.base:
            settings.update(P.preset_settings(args.base))
        if args.config:
            settings.update(_settings_from_config_file(args.config))
        names = {f for f in TrainConfig.__dataclass_fields__ if f not in RUN_ONLY_FIELDS}
        settings.update({k: v for k, v in vars(args).items() if k in names})
        if not settings:
            raise ValueError("presets save: nothing to save — give --from, --config or training options")
        path = P.save_preset(args.name, settings, description=args.description,
                             scope="user" if args.user else "project", overwrite=args.overwrite)
        say(f"saved preset {args.name} ({len(settings)} settings) to {path}")
        return EXIT_OK
    if action == "delete":
        path = P.delete_preset(args.name, scope=args.scope)
        say(f"deleted {path}")
        return EXIT_OK
    raise ValueError(f"presets: unknown action {action!r}")
