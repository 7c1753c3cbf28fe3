"""Tests of uda_ray.verdict: claims judged from seeds on hand-checkable cases, the committed
results file and --against, the generated README blocks, seeds on demand, and the claims of
every study script naming rows that exist."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from uda_ray.errors import UserError
from uda_ray.verdict import (HOLDS, REVERSES, UNDECIDED, Claim, against, judge, read_results, render,
                             update_readme, values_of_results)

T_975 = {1: 12.706204736174698, 2: 4.302652729749464, 4: 2.7764451051977934}  # Student t(0.975, df)


def _vals(better, than):
    return {"b": {str(s): v for s, v in enumerate(better)}, "a": {str(s): v for s, v in enumerate(than)}}


def test_a_claim_holds_reverses_or_is_not_decided_by_its_paired_t_interval():
    c = Claim("b beats a", better="b", than="a", paper=1.5)
    # paired differences 1, 2, 3: mean 2, std 1, half-width t(0.975, 2) / sqrt(3) = 2.4842
    v = judge(c, _vals([21, 32, 43], [20, 30, 40]))
    assert (v.n, v.wins) == (3, 3) and v.mean == pytest.approx(2.0) and v.std == pytest.approx(1.0)
    half = T_975[2] / math.sqrt(3)
    assert v.detectable == pytest.approx(half)
    assert (v.lo, v.hi) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert v.verdict == UNDECIDED and v.label == "not decided at 3 seeds"  # all 3 seeds won, yet undecided
    # differences 1.0, 1.2, 1.1: mean 1.1, std 0.1: [1.1 - 0.2484, 1.1 + 0.2484] above 0
    v = judge(c, _vals([11.0, 11.2, 11.1], [10, 10, 10]))
    assert v.verdict == HOLDS and v.lo == pytest.approx(1.1 - 0.1 * half)
    v = judge(c, _vals([9.0, 8.8, 8.9], [10, 10, 10]))
    assert v.verdict == REVERSES and v.wins == 0 and v.hi == pytest.approx(-1.1 + 0.1 * half)
    # 5 seeds: t(0.975, 4)
    v = judge(c, _vals([1, 2, 3, 4, 5], [0, 0, 0, 0, 0]))
    assert v.detectable == pytest.approx(T_975[4] * math.sqrt(2.5) / math.sqrt(5)) and v.verdict == HOLDS


def test_only_seeds_both_rows_finished_are_paired_and_one_seed_decides_nothing():
    c = Claim("b beats a", better="b", than="a")
    v = judge(c, {"b": {"0": 30.0, "1": 31.0, "7": 99.0}, "a": {"0": 29.0, "2": 10.0}})
    assert v.n == 1 and v.seeds == ["0"] and v.mean == 1.0 and math.isnan(v.lo) and v.verdict == UNDECIDED
    assert judge(c, {"b": {"0": 1.0}}).n == 0
    # a stricter level widens the interval (what --until-decided's stop rule uses)
    vals = _vals([11.0, 11.2, 11.1], [10, 10, 10])
    assert judge(c, vals, level=0.99).detectable > judge(c, vals).detectable


def test_the_verdict_table_renders_every_column():
    c = Claim("Mul-Adv beats Adv", better="b", than="a", paper=1.2, note="control")
    text = render([judge(c, _vals([11.0, 11.2, 11.1], [10, 10, 10]))], "text")
    head, line = text.splitlines()[:2]
    assert head.split()[:3] == ["claim", "paper", "Δ"]
    assert "Mul-Adv beats Adv [b vs a]" in line and "+1.2" in line and "+1.10 ± 0.10" in line  # no note in a terminal
    assert "[+0.85, +1.35]" in line and "3/3" in line and "holds" in line and "0.25" in line
    md = render([judge(c, _vals([11.0, 11.2, 11.1], [10, 10, 10]))], "markdown")
    assert md.splitlines()[0].startswith("| claim | paper Δ |") and md.count("\n") == 2
    assert "| Mul-Adv beats Adv (control) [b vs a] |" in md
    tex = render([judge(c, _vals([11.0, 11.2, 11.1], [10, 10, 10]))], "latex")
    assert r"\toprule" in tex and r"$\pm$" in tex and "[b vs a]" in tex


def test_a_claim_naming_no_row_is_refused_when_the_study_is_defined():
    from uda_ray.study import Row, Study

    rows = [Row("source_only", "source_only"), Row("adv", "adaptseg", init_from="source_only")]
    with pytest.raises(UserError, match="claim 'x': than='source_onyl' is not a row.*did you mean 'source_only'"):
        Study(name="s", rows=rows, claims=[Claim("x", better="adv", than="source_onyl")])
    with pytest.raises(UserError, match="compares row adv with itself"):
        Study(name="s", rows=rows, claims=[Claim("x", better="adv", than="adv")])
    with pytest.raises(UserError, match="two claims are named 'x'"):
        Study(name="s", rows=rows, claims=[Claim("x", "adv", "source_only"), Claim("x", "source_only", "adv")])


def test_every_study_scripts_claims_name_its_rows():
    from uda_ray.study import load_study

    studies = sorted(Path(__file__).resolve().parents[1].glob("studies/*.py"))
    with_claims = [p.stem for p in studies if load_study(p).claims]  # loading checks every claim
    for table in ("mat_table3", "mat_table4", "dast_table3", "dast_table4", "jal_table4", "pww_table3",
                  "curriculum_table1", "cross_method", "quickstart"):
        assert table in with_claims


def _results(path: Path, rows: dict) -> Path:
    lines = ["row,seed,val_mIoU,sel_mIoU,lineage,code_commit,code_fingerprint,data_fingerprint"]
    lines += [f"{r},{s},{v!r},{v - 1!r},l{r}{s},abc1234567,c0de,synth:da7a" for r, seeds in rows.items()
              for s, v in seeds.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_against_lists_every_row_x_seed_that_differs_to_the_last_digit(tmp_path):
    committed = values_of_results(read_results(_results(tmp_path / "r.csv", {
        "a": {"0": 20.123456789012345, "1": 21.0}, "b": {"0": 22.0, "1": 23.0}})))
    assert committed["a"]["0"] == 20.123456789012345   # read back to every digit
    same = {"a": {"0": 20.123456789012345, "1": 21.0}, "b": {"0": 22.0, "1": 23.0}}
    lines, n = against(same, committed)
    assert n == 0 and lines == ["all 4 row x seed(s) equal to every digit"]
    changed = {"a": {"0": math.nextafter(20.123456789012345, 99), "1": 21.0}, "b": {"0": 22.0}, "c": {"0": 1.0}}
    lines, n = against(changed, committed)
    assert n == 2 and lines[0] == "2 row x seed(s) equal to every digit, 2 differ"
    assert any(line.startswith("  a s0: 20.1235 here, committed 20.1235 (Δ +") for line in lines)
    assert "  b s1: committed 23.0000, not in this store" in lines
    # seeds a re-run added (--until-decided) are listed, not counted as differences
    assert lines[-1] == "  not in the committed results (new here, not compared): c s0"


def test_a_results_file_that_is_not_one_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no results file"):
        read_results(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("row,seed\na,0\n")
    with pytest.raises(UserError, match=r"bad.csv: not a results file: no column\(s\) val_mIoU"):
        read_results(tmp_path / "bad.csv")
    (tmp_path / "nan.csv").write_text("row,seed,val_mIoU\na,0,abc\n")
    with pytest.raises(UserError, match=r"nan.csv:2: val_mIoU 'abc' is not a number"):
        read_results(tmp_path / "nan.csv")


def _claims_of(path):
    from uda_ray.study import load_study

    return load_study(path).claims


def test_the_readme_verdict_blocks_are_generated_from_committed_results(tmp_path):
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "toy.py").write_text(
        "from uda_ray.study import Claim, Row, Study\n"
        "STUDY = Study(name='toy', rows=[Row('a', 'source_only'), Row('b', 'source_only')],\n"
        "              claims=[Claim('b beats a', better='b', than='a', paper=2.0)])\n")
    (tmp_path / "results").mkdir()
    _results(tmp_path / "results" / "toy_seeds.csv",
             {"a": {"0": 20.0, "1": 21.0, "2": 22.0}, "b": {"0": 21.0, "1": 22.2, "2": 23.1}})
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- verdicts:toy -->\nhand-typed\n<!-- /verdicts:toy -->\nafter\n")
    kw = dict(studies_dir=tmp_path / "studies", results_dir=tmp_path / "results", claims_of=_claims_of)
    assert update_readme(readme, check=True, **kw) == (["toy"], ["toy"])
    assert "hand-typed" in readme.read_text()          # --check changes nothing
    assert update_readme(readme, **kw) == (["toy"], [])
    text = readme.read_text()
    assert "hand-typed" not in text and text.endswith("<!-- /verdicts:toy -->\nafter\n")
    assert "| b beats a [b vs a] | +2.0 | +1.10 ± 0.10 | [+0.85, +1.35] | 3/3 | holds | 0.25 |" in text
    # relative to the README; the commit and the training code's fingerprint of the results
    assert "from [`results/toy_seeds.csv`](results/toy_seeds.csv), code abc1234567, training code c0de (target-val" in text
    assert update_readme(readme, check=True, **kw) == ([], [])


def test_the_committed_readme_is_as_uda_ray_verdicts_generates_it():
    root = Path(__file__).resolve().parents[1]
    changed, stale = update_readme(root / "studies" / "README.md", root / "studies", root / "studies" / "results",
                                   check=True, claims_of=_claims_of)
    assert stale == [], f"run `uda-ray verdicts`: the tables of {stale} are not as generated"


def test_seeds_on_demand_parse_ranges_lists_and_additions():
    from uda_ray.study import parse_seeds

    assert parse_seeds("0-5") == (0, 1, 2, 3, 4, 5)
    assert parse_seeds("0,1,2,7") == (0, 1, 2, 7) and parse_seeds("0-2,5") == (0, 1, 2, 5)
    assert parse_seeds(None, 2, (0, 1, 2)) == (0, 1, 2, 3, 4)
    assert parse_seeds("3,0", 1) == (3, 0, 4)          # order kept: a search row searches on the first
    for bad in ("a", "5-2", "", "-1"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)
