"""Renderings of a ``dedup check`` result: a summary for the terminal, JSON, JUnit XML and
Markdown (a pull-request comment or ``$GITHUB_STEP_SUMMARY``), as :mod:`dedup.report` is for a
run. Pure functions of a :class:`~dedup.check.CheckResult`; nothing here decides anything."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from dedup.check import CheckResult, LimitResult

__all__ = ["summary_lines", "to_json", "to_junit", "to_markdown"]

def to_json(result: CheckResult) -> str:
    return json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n"


def summary_lines(result: CheckResult) -> list[str]:
    """A few lines for people: the verdict, the drop, one line per limit, the worst match."""
    verdict = "PASSED" if result.passed else f"FAILED ({len(result.failed_limits)} of {len(result.limits)} limits exceeded)"
    lines = [
        f"dedup check: {verdict}",
        f"drop {result.source}: {result.samples} samples ({result.failed} failed) in {_shards(result.new_shards)}"
        + (f" ({result.known_shards} already in the index, skipped)" if result.known_shards else "")
        + f" · baseline {result.against}: {result.baseline_samples} samples",
    ]
    for limit in result.limits:
        status = "off " if limit.off else ("ok  " if limit.passed else "FAIL")
        bound = "no limit" if limit.off else (f"limit {limit.show(limit.limit)}")
        count = f" ({limit.count} sample{'' if limit.count == 1 else 's'})" if limit.is_share else ""
        lines.append(f"  {status} {limit.label}: {limit.show(limit.value)}{count}, {bound}")
    if result.baseline_matches:
        w = result.baseline_matches[0]
        lines.append(f"worst: {w.sample_id} duplicates {w.match_id} ({w.signal}, {w.similarity:.3f})")
    if result.updated:
        lines.append(f"added to the index: {result.against}")
    return lines


def to_junit(result: CheckResult) -> str:
    """JUnit XML: one testsuite, one testcase per limit (failure when exceeded, skipped when off)."""
    failures = len(result.failed_limits)
    skipped = sum(1 for limit in result.limits if limit.off)
    total = f"{result.seconds.get('total', 0.0):.3f}"
    suites = ET.Element("testsuites", name="dedup check", tests=str(len(result.limits)), failures=str(failures),
                        errors="0", skipped=str(skipped), time=total)
    suite = ET.SubElement(suites, "testsuite", name=f"dedup check {result.source}", tests=str(len(result.limits)),
                          failures=str(failures), errors="0", skipped=str(skipped), time=total)
    props = ET.SubElement(suite, "properties")
    for name, value in (
        ("against", result.against),
        ("baseline_samples", result.baseline_samples),
        ("drop_samples", result.samples),
        ("drop_failed", result.failed),
        ("duplicating_baseline", result.duplicating_baseline),
        ("duplicated_within_drop", result.duplicated_within_drop),
        ("largest_cluster", result.largest_cluster),
    ):
        ET.SubElement(props, "property", name=name, value=str(value))
    for limit in result.limits:
        case = ET.SubElement(suite, "testcase", classname="dedup.check", name=limit.name, time="0")
        if limit.off:
            ET.SubElement(case, "skipped", message="limit turned off")
        elif not limit.passed:
            message = f"{limit.label}: {limit.show(limit.value)} exceeds the limit {limit.show(limit.limit)}"
            failure = ET.SubElement(case, "failure", message=message, type="GateLimitExceeded")
            failure.text = "\n".join(_evidence(result, limit))
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def _evidence(result: CheckResult, limit: LimitResult) -> list[str]:
    matches = result.drop_matches if limit.name == "max_share_duplicated_within_drop" else result.baseline_matches
    if limit.name == "max_cluster_size":
        return [f"largest cluster: {limit.count} samples ({result.largest_cluster_drop_samples} from the drop), "
                f"e.g. {result.largest_cluster_example}"]
    return [f"{m.sample_id} -> {m.match_id} ({m.signal}, {m.similarity:.3f})" for m in matches]


def to_markdown(result: CheckResult) -> str:
    """A Markdown summary for a pull-request comment or ``$GITHUB_STEP_SUMMARY``."""
    head = "✅ passed" if result.passed else "❌ failed"
    out = [
        f"## dedup check: {head}",
        "",
        f"Drop `{_code(result.source)}`: **{result.samples}** samples ({result.failed} failed) in "
        f"{_shards(result.new_shards)}, against `{_code(result.against)}` ({result.baseline_samples} samples)."
        + (f" {result.known_shards} shards already in the index were skipped." if result.known_shards else ""),
        "",
        "| check | value | limit | result |",
        "| --- | ---: | ---: | :---: |",
    ]
    for limit in result.limits:
        value = limit.show(limit.value) + (f" ({limit.count})" if limit.is_share else "")
        bound = "off" if limit.off else limit.show(limit.limit)
        verdict = "–" if limit.off else ("✅" if limit.passed else "❌")
        out.append(f"| {limit.label} | {value} | {bound} | {verdict} |")
    if result.baseline_matches:
        out += [
            "",
            f"### Worst offenders: duplicates of the baseline ({result.duplicating_baseline})",
            "",
            "| sample | baseline match | similarity | signal |",
            "| --- | --- | ---: | --- |",
        ]
        out += [f"| {_cell(m.sample_id)} | {_cell(m.match_id)} | {m.similarity:.3f} | {m.signal} |" for m in result.baseline_matches]
    if result.drop_matches:
        out += [
            "",
            f"### Duplicates within the drop ({result.duplicated_within_drop})",
            "",
            "| sample | duplicate of | similarity | signal |",
            "| --- | --- | ---: | --- |",
        ]
        out += [f"| {_cell(m.sample_id)} | {_cell(m.match_id)} | {m.similarity:.3f} | {m.signal} |" for m in result.drop_matches]
    if result.largest_cluster > 1:
        out += ["", f"Largest cluster: {result.largest_cluster} samples ({result.largest_cluster_drop_samples} "
                    f"from the drop), e.g. {_cell(result.largest_cluster_example or '')}."]
    if result.updated:
        out += ["", "The drop was added to the index."]
    return "\n".join(out) + "\n"


def _shards(n: int) -> str:
    return f"{n} new shard" + ("" if n == 1 else "s")


def _code(text: str) -> str:
    return text.replace("`", "'")


def _cell(text: str) -> str:
    """A sample id as a table cell: in backticks, with the characters that break tables escaped."""
    return "`" + _code(text).replace("|", "\\|").replace("\n", " ") + "`"
