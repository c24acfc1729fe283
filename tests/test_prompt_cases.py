"""A table of prompts and what AUTOMATIC1111's prompt parser makes of them (modules/prompt_parser.py).

Every expected value is worked out from the reference algorithm by hand, with the reasoning in the comment
where it is not obvious:
- attention: tokens are escapes `\\(` `\\)` `\\[` `\\]` `\\\\`, a lone backslash (dropped), `(`, `[`, `:w)` (weight
  close), `)`, `]`, text runs and lone colons. A bracket multiplies every fragment appended since it opened
  when it closes; unclosed round brackets apply at the end, then unclosed square ones, each in opening
  order. Closers with nothing open are text. Text runs are split on `\\s*\\bBREAK\\b\\s*`. Equal neighbours merge.
  Weights are written as products in the order the reference multiplies them (R = 1.1, S = 1 / 1.1).
- schedules: the lark grammar `[ [p :] p : NUMBER ]`, `[p (| [p])+]`, emphasis groups, and stray `[]():`
  outside groups; a `|` outside an alternation or an unfinished backslash escape fails the parse and the
  prompt is used as is. Boundaries: "." in N -> int(N * steps), else N; min(steps, .); kept when >= 1.
- AND: split on `\\bAND\\b`; each part matched by `^(.*?)(?:\\s*:\\s*([-+]?(?:\\d+\\.?|\\d*\\.\\d+)))?\\s*$`.
"""

from __future__ import annotations

import pytest

from tiengine.text.prompt import Fragment, parse_prompt_attention, prompt_schedule, split_and

R = 1.1  # round bracket
S = 1 / 1.1  # square bracket: the reference multiplies by this constant, it never divides

ATTENTION_CASES = [
    # -- plain text and the reference's own docstring examples
    ("", [("", 1.0)]),
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        # the first "(" never closes, so everything after it gets one more 1.1 at the end
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # -- round, square, explicit weights, nesting
    ("(x)", [("x", R)]),
    ("[x]", [("x", S)]),
    ("((x))", [("x", R * R)]),
    ("(((x)))", [("x", R * R * R)]),
    ("((((x))))", [("x", 1.4641000000000006)]),  # chained products, not 1.1 ** 4 (1.4641000000000004)
    ("[[x]]", [("x", S * S)]),
    ("[[[x]]]", [("x", S * S * S)]),
    ("(x:1.5)", [("x", 1.5)]),
    ("((x:1.5))", [("x", 1.6500000000000001)]),  # 1.5 first (inner close), then 1.1
    ("[(x:1.5)]", [("x", 1.5 * S)]),
    ("((x:1.3))", [("x", 1.3 * R)]),
    ("(x:0.5)", [("x", 0.5)]),
    ("(x: 1.5 )", [("x", 1.5)]),
    ("(x:1.5 )", [("x", 1.5)]),
    ("(x :1.5)", [("x ", 1.5)]),
    ("(x:+2)", [("x", 2.0)]),
    ("(x:-1)", [("x", -1.0)]),  # a negative weight on text, not a BREAK
    ("(x:0)", [("x", 0.0)]),
    ("(x:.5)", [("x", 0.5)]),
    ("(x:2.)", [("x", 2.0)]),
    ("(x:00.50)", [("x", 0.5)]),
    ("(x:\u0661.\u0665)", [("x", 1.5)]),  # \d and float() both take Arabic-Indic digits
    ("((a:2):3)", [("a", 6.0)]),
    ("(a:1:2)", [("a:1", 2.0)]),  # first ":" is text, ":2)" closes the bracket
    ("(a (b:2) c)", [("a ", R), ("b", 2 * R), (" c", R)]),
    ("(a [b] c)", [("a ", R), ("b", S * R), (" c", R)]),
    # -- colons that are not weights
    ("(x:1e2)", [("x:1e2", R)]),  # an exponent is not in [.\d]+, so ":" and "1e2" are text
    ("(x:abc)", [("x:abc", R)]),
    ("(a:b)", [("a:b", R)]),
    (":", [(":", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("(x:1.5", [("x:1.5", R)]),  # no ")" after the number: text, and the bracket is unclosed
    ("x:1.5)", [("x:1.5)", 1.0)]),  # weight close with no open round bracket: text
    ("[x:1.2]", [("x:1.2", S)]),  # emphasis only sees square brackets (a schedule is handled earlier)
    ("(:1.5)", [("", 1.0)]),
    # -- unmatched and crossed brackets
    ("a)", [("a)", 1.0)]),
    ("a]", [("a]", 1.0)]),
    ("(a))", [("a", R), (")", 1.0)]),
    ("]a[", [("]a", 1.0)]),
    ("(a]", [("a]", R)]),
    ("[a)", [("a)", S)]),
    ("([a)]", [("a", 1.0)]),  # ")" closes the round one (x1.1), "]" the square one: 1.1 * (1/1.1) == 1.0
    ("a [(b)] c", [("a b c", 1.0)]),  # 1.1 * (1/1.1) is exactly 1.0, so all three merge
    ("(([x]:1.3))", [("x", S * 1.3 * R)]),  # order matters: 1.3000000000000003
    ("((a", [("a", R * R)]),
    ("(a (b", [("a ", R), ("b", R * R)]),
    ("((a)", [("a", R * R)]),
    ("[(a", [("a", 1.0)]),  # at the end round first (1.1), then square (1/1.1)
    ("[((y:1.3)", [("y", 1.3 * R * S)]),  # round before square at the end: 1.3, not 1.3000000000000003
    ("[a (b", [("a ", S), ("b", R * S)]),
    ("()", [("", 1.0)]),
    ("[]", [("", 1.0)]),
    ("a()b", [("ab", 1.0)]),
    ("(a)(b:1.1)", [("ab", 1.1)]),  # float("1.1") == 1.1: merged
    ("((a))(b:1.21)", [("a", 1.2100000000000002), ("b", 1.21)]),  # 1.1 * 1.1 != 1.21: not merged
    ("(a\nb)", [("a\nb", R)]),
    # -- escapes and backslashes
    ("\\(x\\)", [("(x)", 1.0)]),
    ("\\[x\\]", [("[x]", 1.0)]),
    ("a\\\\b", [("a\\b", 1.0)]),
    ("\\\\(x)", [("\\", 1.0), ("x", R)]),
    ("(\\))", [(")", R)]),
    ("\\((x)", [("(", 1.0), ("x", R)]),
    ("(a\\)", [("a)", R)]),  # the escaped ")" closes nothing: the bracket stays open to the end
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is its own token and gives an empty fragment
    ("a\\", [("a", 1.0)]),
    ("\\", [("", 1.0)]),
    ("\\n", [("n", 1.0)]),
    ("a \\| b", [("a | b", 1.0)]),
    ("\\:", [(":", 1.0)]),
    # -- BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("BREAK BREAK", [("", 1.0), ("BREAK", -1), ("", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("a  BREAK\n b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),  # whitespace around it is dropped
    ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1), (",b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a BREAKb", [("a BREAKb", 1.0)]),
    ("a_BREAK b", [("a_BREAK b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("a Break b", [("a Break b", 1.0)]),
    ("(a BREAK b)", [("a", R), ("BREAK", -1 * R), ("b", R)]),  # in brackets: weight -1.1, so it is text
    ("[BREAK]", [("", S), ("BREAK", -1 * S), ("", S)]),
    ("a (BREAK:1) b", [("a ", 1.0), ("BREAK", -1.0), (" b", 1.0)]),  # x1.0 keeps it a break
    ("(a)BREAK", [("a", R), ("", 1.0), ("BREAK", -1), ("", 1.0)]),  # ")" ends the run: "BREAK" is a word
    ("a\\BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),  # the lone backslash ends the text run
    ("x:BREAK", [("x:", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("a BREAK (b)", [("a", 1.0), ("BREAK", -1), ("", 1.0), ("b", R)]),
    ("(a BREAK b:0)", [("aBREAKb", 0.0)]),  # 0.0 == -0.0: all three merge into one text fragment
]

# (prompt, steps, options, expected [(end_at_step, text)])
SCHEDULE_CASES = [
    # -- the reference's docstring examples
    ("test", 10, {}, [(10, "test")]),
    ("a [b:3]", 10, {}, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, {}, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, {}, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, {}, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, {}, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, {}, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, {}, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, {}, [(5, "a  c"), (10, "a b c")]),
    # "|" is not plain text in the grammar, so this prompt does not parse at all (the docstring's
    # expectation predates alternation and no longer holds)
    ("a [{b|d{:.5] c", 10, {}, [(10, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", 10, {}, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 4, {}, [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)")]),
    ("[fe|]male", 4, {}, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[fe|||]male", 6, {}, [(1, "female"), (2, "male"), (3, "male"), (4, "male"), (5, "female"), (6, "male")]),
    ("a [b:.5] c", 10, {"hires_steps": 10}, [(10, "a b c")]),
    ("a [b:1.5] c", 10, {"hires_steps": 10}, [(5, "a  c"), (10, "a b c")]),
    # -- absolute boundaries, clamping, boundaries below 1
    ("", 10, {}, [(10, "")]),
    ("[a:b:5]", 10, {}, [(5, "a"), (10, "b")]),
    ("[a:b:1]", 10, {}, [(1, "a"), (10, "b")]),
    ("[a:b:9]", 10, {}, [(9, "a"), (10, "b")]),
    ("[a:b:10]", 10, {}, [(10, "a")]),  # boundary == steps: "b" is never reached
    ("[a:b:15]", 10, {}, [(10, "a")]),
    ("[a:b:99999999999999999999]", 10, {}, [(10, "a")]),
    ("[a:b:0]", 10, {}, [(10, "b")]),  # step <= 0 never holds: "after" from the first step
    ("[a:b:-3]", 10, {}, [(10, "b")]),
    ("[a:b:+3]", 10, {}, [(3, "a"), (10, "b")]),
    ("[a:b:3]", 3, {}, [(3, "a")]),
    ("[a:b:2e0]", 10, {}, [(2, "a"), (10, "b")]),  # no "." in the token: absolute
    ("[a:b:1e1]", 10, {}, [(10, "a")]),
    # -- fractions (a "." anywhere in the number)
    ("[a:b:0.5]", 10, {}, [(5, "a"), (10, "b")]),
    ("[a:b:0.25]", 10, {}, [(2, "a"), (10, "b")]),  # int(2.5)
    ("[a:b:0.33]", 20, {}, [(6, "a"), (20, "b")]),  # int(6.6000000000000005)
    ("[a:b:0.29]", 100, {}, [(28, "a"), (100, "b")]),  # 0.29 * 100 == 28.999999999999996
    ("[a:b:0.57]", 100, {}, [(56, "a"), (100, "b")]),  # 56.99999999999999
    ("[a:b:0.7]", 10, {}, [(7, "a"), (10, "b")]),
    ("[a:b:.1]", 10, {}, [(1, "a"), (10, "b")]),
    ("[a:b:0.05]", 10, {}, [(10, "b")]),  # int(0.5) == 0
    ("[a:b:1.0]", 10, {}, [(10, "a")]),  # the whole run
    ("[a:b:5.]", 10, {}, [(10, "a")]),  # "5." is a fraction: 50 steps, clamped
    ("[a:b:1.5]", 10, {}, [(10, "a")]),
    ("[a:b:0.5e1]", 10, {}, [(10, "a")]),  # has a ".": 5.0 * 10
    ("[a:b: 3 ]", 10, {}, [(3, "a"), (10, "b")]),
    ("[a:b:\t3\n]", 10, {}, [(3, "a"), (10, "b")]),
    ("[a:b:\u30003]", 10, {}, [(3, "a"), (10, "b")]),  # ideographic space is \s
    # -- the three forms and empty parts
    ("[a:3]", 10, {}, [(3, ""), (10, "a")]),
    ("[a::3]", 10, {}, [(3, "a"), (10, "")]),
    ("[:b:3]", 10, {}, [(3, ""), (10, "b")]),
    ("[::3]", 10, {}, [(3, ""), (10, "")]),
    ("[:3]", 10, {}, [(3, ""), (10, "")]),
    (
        "a [b:c:2] d [e::4] f [g:6]",
        10,
        {},
        [(2, "a b d e f "), (4, "a c d e f "), (6, "a c d  f "), (10, "a c d  f g")],
    ),
    ("[a:b:5][c:d:0.5]", 10, {}, [(5, "ac"), (10, "bd")]),
    ("[a:b:3] [c:d:6]", 10, {}, [(3, "a c"), (6, "b c"), (10, "b d")]),
    # -- not schedules: the text is used as is
    ("[a:b:3 x]", 10, {}, [(10, "[a:b:3 x]")]),
    ("[a:b:c]", 10, {}, [(10, "[a:b:c]")]),
    ("[a:b:]", 10, {}, [(10, "[a:b:]")]),
    ("[a:b:c:3]", 10, {}, [(10, "[a:b:c:3]")]),  # three colons fit no group
    ("[a:b:1.2.3]", 10, {}, [(10, "[a:b:1.2.3]")]),
    ("[a:b:\uff13]", 10, {}, [(10, "[a:b:\uff13]")]),  # NUMBER is ASCII digits only
    ("[a:b:(3)]", 10, {}, [(10, "[a:b:(3)]")]),
    ("[a:b:1e]", 10, {}, [(10, "[a:b:1e]")]),
    ("[]", 10, {}, [(10, "[]")]),
    ("[:]", 10, {}, [(10, "[:]")]),
    ("[x]", 10, {}, [(10, "[x]")]),
    ("(a:b:c)", 10, {}, [(10, "(a:b:c)")]),
    ("a|b", 10, {}, [(10, "a|b")]),
    # -- parse failures make the whole prompt plain text, its schedules included
    ("a|b [c:d:3]", 10, {}, [(10, "a|b [c:d:3]")]),
    ("(a|b) [c:d:3]", 10, {}, [(10, "(a|b) [c:d:3]")]),
    ("[a|b:3] [c:d:3]", 10, {}, [(10, "[a|b:3] [c:d:3]")]),
    ("[c:d:3] \\", 10, {}, [(10, "[c:d:3] \\")]),  # a backslash needs a following character
    ("[c:d:3]\\\nx", 10, {}, [(10, "[c:d:3]\\\nx")]),  # ... other than a newline
    # -- escapes stay as written (the attention parser reads them later)
    ("\\| [c:d:3]", 10, {}, [(3, "\\| c"), (10, "\\| d")]),
    ("[\\[a\\]:b:3]", 10, {}, [(3, "\\[a\\]"), (10, "b")]),
    ("[a\\:b:3]", 10, {}, [(3, ""), (10, "a\\:b")]),
    ("\\[a:b:3]", 10, {}, [(10, "\\[a:b:3]")]),  # the escaped "[" opens nothing
    ("[c:d:3]\\\\", 10, {}, [(3, "c\\\\"), (10, "d\\\\")]),
    ("[c:d:3]\\\r", 10, {}, [(3, "c\\\r"), (10, "d\\\r")]),  # only "\n" cannot be escaped
    # -- groups around and inside schedules
    ("[[a:b:3]]", 10, {}, [(3, "[a]"), (10, "[b]")]),
    ("([a:b:3])", 10, {}, [(3, "(a)"), (10, "(b)")]),
    ("(a [b:c:2]:1.2)", 10, {}, [(2, "(a b:1.2)"), (10, "(a c:1.2)")]),
    ("(a:[1:2:3])", 10, {}, [(3, "(a:1)"), (10, "(a:2)")]),  # the weight itself is scheduled
    ("[a:(b):3]", 10, {}, [(3, "a"), (10, "(b)")]),
    ("[(a:b):c:3]", 10, {}, [(3, "(a:b)"), (10, "c")]),
    ("[[x]:[y]:3]", 10, {}, [(3, "[x]"), (10, "[y]")]),
    # -- nested schedules
    ("[[a:b:2]:c:5]", 10, {}, [(2, "a"), (5, "b"), (10, "c")]),
    ("[a:[b:c:7]:3]", 10, {}, [(3, "a"), (7, "b"), (10, "c")]),
    ("[a:[b:c:2]:5]", 10, {}, [(2, "a"), (5, "a"), (10, "c")]),  # equal texts are not merged
    ("[a:[b:c:20]:0.5]", 10, {}, [(5, "a"), (10, "b")]),
    # -- stray brackets next to well-formed groups (readings that lark gives whatever the hash seed)
    ("([a:b:3]", 10, {}, [(3, "(a"), (10, "(b")]),
    ("[[a:b:3]", 10, {}, [(3, "[a"), (10, "[b")]),
    ("][a:b:3]", 10, {}, [(3, "]a"), (10, "]b")]),
    ("[a:b:3] ]", 10, {}, [(3, "a ]"), (10, "b ]")]),
    ("[a:b:3] :x", 10, {}, [(3, "a :x"), (10, "b :x")]),
    ("[a:[b:1]", 10, {}, [(1, "[a:"), (10, "[a:b")]),
    ("(a:b:c) [d:e:2]", 10, {}, [(2, "(a:b:c) d"), (10, "(a:b:c) e")]),
    # -- alternation
    ("[a|b]", 4, {}, [(1, "a"), (2, "b"), (3, "a"), (4, "b")]),
    ("[a|b|c]", 5, {}, [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]),
    ("[|b]", 3, {}, [(1, ""), (2, "b"), (3, "")]),
    ("[a|]", 3, {}, [(1, "a"), (2, ""), (3, "a")]),
    ("[|]", 2, {}, [(1, ""), (2, "")]),
    ("[ a | b ]", 2, {}, [(1, " a "), (2, " b ")]),
    ("x [a|b]", 1, {}, [(1, "x a")]),
    ("[a|b] [c|d|e]", 6, {}, [(1, "a c"), (2, "b d"), (3, "a e"), (4, "b c"), (5, "a d"), (6, "b e")]),
    ("[a|[b|c]]", 4, {}, [(1, "a"), (2, "c"), (3, "a"), (4, "c")]),  # the inner one sees the same step
    ("[a|[b:c:3]]", 4, {}, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[[a|b]:c:3]", 4, {}, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[a|b] [c:d:2]", 3, {}, [(1, "a c"), (2, "b c"), (3, "a d")]),
    ("[(a:1.2)|[b]]", 2, {}, [(1, "(a:1.2)"), (2, "[b]")]),
    ("[a|b]]", 2, {}, [(1, "a]"), (2, "b]")]),
    ("[[a|b]", 2, {}, [(1, "[a"), (2, "[b")]),
    # -- legacy scheduling: N < 1 is a fraction, anything else an absolute step
    ("[a:b:0.5]", 10, {"legacy_fractions": True}, [(5, "a"), (10, "b")]),
    ("[a:b:5]", 10, {"legacy_fractions": True}, [(5, "a"), (10, "b")]),
    ("[a:b:5.0]", 10, {"legacy_fractions": True}, [(5, "a"), (10, "b")]),
    ("[a:b:1.5]", 10, {"legacy_fractions": True}, [(1, "a"), (10, "b")]),
    ("[a:b:1.0]", 10, {"legacy_fractions": True}, [(1, "a"), (10, "b")]),
    ("[a:b:0.05]", 10, {"legacy_fractions": True}, [(10, "b")]),
    ("[a:b:-1]", 10, {"legacy_fractions": True}, [(10, "b")]),
    ("[a:b:0.5]", 10, {"legacy_fractions": True, "hires_steps": 20}, [(5, "a"), (10, "b")]),  # hires ignored
    # -- hires fix second pass: integers count from the end of the first pass, fractions from 1.0
    ("[a:b:15]", 10, {"hires_steps": 20}, [(5, "a"), (20, "b")]),
    ("[a:b:5]", 10, {"hires_steps": 20}, [(20, "b")]),
    ("[a:b:1.5]", 10, {"hires_steps": 20}, [(10, "a"), (20, "b")]),
    ("[a:b:0.5]", 10, {"hires_steps": 20}, [(20, "b")]),
    ("[a:b:40]", 10, {"hires_steps": 20}, [(20, "a")]),
    ("[a|b]", 10, {"hires_steps": 3}, [(1, "a"), (2, "b"), (3, "a")]),
    # -- second-order samplers: the step count used for scheduling is doubled
    ("test", 10, {"second_order": True}, [(20, "test")]),
    ("[a:b:5]", 10, {"second_order": True}, [(5, "a"), (20, "b")]),
    ("[a:b:0.5]", 10, {"second_order": True}, [(10, "a"), (20, "b")]),
    ("[a:b:15]", 10, {"second_order": True}, [(15, "a"), (20, "b")]),
    ("[a|b]", 2, {"second_order": True}, [(1, "a"), (2, "b"), (3, "a"), (4, "b")]),
    ("a|b", 3, {"second_order": True}, [(6, "a|b")]),
    ("[a:b:25]", 10, {"second_order": True, "hires_steps": 5}, [(5, "a"), (10, "b")]),
]

AND_CASES = [
    ("a", [("a", 1.0)]),
    ("", [("", 1.0)]),
    ("a AND b", [("a", 1.0), (" b", 1.0)]),
    ("a AND b:0.5", [("a", 1.0), (" b", 0.5)]),
    ("a:2 AND b", [("a", 2.0), (" b", 1.0)]),
    ("a :  2  AND b", [("a", 2.0), (" b", 1.0)]),
    (" a : 2 ", [(" a", 2.0)]),  # leading whitespace stays, trailing goes
    ("a:2\n", [("a", 2.0)]),
    ("a AND", [("a", 1.0), ("", 1.0)]),
    ("AND", [("", 1.0), ("", 1.0)]),
    ("a AND AND b", [("a", 1.0), ("", 1.0), (" b", 1.0)]),
    ("ANDROID AND b", [("ANDROID", 1.0), (" b", 1.0)]),
    ("a and b", [("a and b", 1.0)]),
    ("aANDb", [("aANDb", 1.0)]),
    ("a_AND_b", [("a_AND_b", 1.0)]),
    ("a,AND,b", [("a,", 1.0), (",b", 1.0)]),
    ("a-AND-b:3", [("a-", 1.0), ("-b", 3.0)]),
    ("(a AND b:1.2)", [("(a", 1.0), (" b:1.2)", 1.0)]),  # splits inside brackets too
    ("(a:1.2) AND b", [("(a:1.2)", 1.0), (" b", 1.0)]),
    ("[a:b:3] AND c", [("[a:b:3]", 1.0), (" c", 1.0)]),
    ("a:-1 AND b", [("a", -1.0), (" b", 1.0)]),
    ("a AND b:0", [("a", 1.0), (" b", 0.0)]),
    ("a:+0.5", [("a", 0.5)]),
    ("a:.5", [("a", 0.5)]),
    ("a:5.", [("a", 5.0)]),
    ("a:1.2.3", [("a:1.2.3", 1.0)]),
    ("a: 1e2", [("a: 1e2", 1.0)]),
    ("a:1:2", [("a:1", 2.0)]),
    ("a::2", [("a:", 2.0)]),
    ("a\nAND\nb", [("a", 1.0), ("\nb", 1.0)]),
    ("a AND b:\u0662", [("a", 1.0), (" b", 2.0)]),  # \d takes Arabic-Indic digits
]


def _exact(pairs: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """Pairs with each weight as its repr, so 1.6500000000000001 and 1.65 differ."""
    return [(text, repr(float(weight))) for text, weight in pairs]


@pytest.mark.parametrize("prompt, expected", ATTENTION_CASES, ids=[repr(case[0]) for case in ATTENTION_CASES])
def test_attention(prompt: str, expected: list[tuple[str, float]]) -> None:
    fragments = parse_prompt_attention(prompt)
    assert all(isinstance(fragment, Fragment) for fragment in fragments)
    assert _exact(fragments) == _exact(expected)


@pytest.mark.parametrize(
    "prompt, steps, options, expected",
    SCHEDULE_CASES,
    ids=[f"{case[0]!r}-{case[1]}-{'-'.join(case[2])}" for case in SCHEDULE_CASES],
)
def test_schedule(prompt: str, steps: int, options: dict, expected: list[tuple[int, str]]) -> None:
    assert [tuple(entry) for entry in prompt_schedule(prompt, steps, **options)] == expected


@pytest.mark.parametrize("prompt, expected", AND_CASES, ids=[repr(case[0]) for case in AND_CASES])
def test_and_parts(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert _exact(split_and(prompt)) == _exact(expected)


def test_table_size() -> None:
    assert len(ATTENTION_CASES) + len(SCHEDULE_CASES) + len(AND_CASES) >= 150
