"""Every command in the README's code blocks is accepted as written.

A full run of each would take hours, so each command goes as far as its arguments: the
settings resolve and pass their range checks (train.py, extract.py, datasets.py,
prepare.py), search.py and plots.py parse them, reproduce.py plans its grid (--dry-run),
--help prints the usage. What the commands then do is tested elsewhere (the demo itself:
tests/test_demo.py; the DEMO feature commands: tests/test_extract.py; search after a run:
tests/test_search.py)."""
import os
import re
import shlex

import pytest

import plots
import prepare
import reproduce
import search
import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    """(script, arguments) of each `python X.py ...` in the README's bash blocks; a line
    may chain commands with && and end in a # comment."""
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        blocks = re.findall(r'```bash\n(.*?)```', f.read(), re.S)
    commands = []
    for line in '\n'.join(blocks).splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index('&&') if '&&' in words else len(words)
            command, words = words[:cut], words[cut + 1:]
            if command[:1] == ['python'] and command[1].endswith('.py'):
                commands.append((command[1], command[2:]))
    return commands


def accept(script, args, capsys):
    """Run the command as far as its arguments go; a UserError or SystemExit fails."""
    if '--help' in args:
        module = {'train.py': 'train', 'datasets.py': 'datasets', 'extract.py': 'extract',
                  'prepare.py': 'prepare'}[script]
        main = __import__(module).main
        assert settings.run_cli(main, args) == 0
        assert 'Settings (KEY=VALUE' in capsys.readouterr().out
    elif script in ('train.py', 'extract.py', 'datasets.py'):
        settings.resolve(args)
    elif script == 'prepare.py':
        prepare.resolve(args)
    elif script == 'search.py':
        search.parse(args)
    elif script == 'plots.py':
        plots.parse(args)
    elif script == 'reproduce.py' and args[:1] == ['summary']:
        reproduce.summary_parser().parse_args(args[1:])
    elif script == 'reproduce.py' and '--plan' in args:   # the measurement is costs.py's test
        import costs
        cost = dict(device='cpu', step_s=1.0, encode_s=0.01, peak_bytes=1e9, img_params=1e6,
                    txt_params=1e6, trained_params=1e6, write_bytes_per_s=None)
        original, costs.measure_cost = costs.measure_cost, lambda *a, **k: cost
        try:
            assert reproduce.main(args) == 0
        finally:
            costs.measure_cost = original
        assert 'time left' in capsys.readouterr().out
    elif script == 'reproduce.py':
        assert reproduce.main(args + ['--dry-run']) == 0
        assert 'would run' in capsys.readouterr().out
    else:
        raise AssertionError(f"README runs {script}, which this test does not know")


COMMANDS = readme_commands()


def test_the_readme_has_its_commands():
    scripts = {script for script, _ in COMMANDS}
    assert {'train.py', 'extract.py', 'search.py', 'reproduce.py', 'datasets.py'} <= scripts
    assert ('train.py', ['DATASET=DEMO']) in COMMANDS                # the demo
    assert all(os.path.isfile(os.path.join(ROOT, script)) for script in scripts)


@pytest.mark.parametrize('script, args', COMMANDS, ids=[' '.join([s, *a])[:60] for s, a in COMMANDS])
def test_readme_command_is_accepted(script, args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # reproduce.py --dry-run looks for finished runs in runs/
    accept(script, args, capsys)


def test_a_wrong_command_is_not_accepted(capsys):
    """The check can fail: a misspelt setting or an unknown grid option is refused."""
    with pytest.raises(settings.UserError, match='CODE_LENGTH'):
        accept('train.py', ['DATASET=DEMO', 'CODE_LENGTH=16'], capsys)
    with pytest.raises(settings.UserError, match='--tables'):
        accept('reproduce.py', ['--tables', '2'], capsys)
    with pytest.raises(settings.UserError):
        accept('search.py', ['query'], capsys)
