"""The Jinja sandbox that chat templates are rendered in (minigptq/chat_template.py), with bounds on time and memory.

A chat template comes with the checkpoint (tokenizer_config.json or chat_template.jinja): it is untrusted code.
Jinja's ImmutableSandboxedEnvironment keeps it from reaching Python's objects, but not from running for ever (loops
nested over range(100000)) or from building gigabytes in one operation ({{ 'x' * 10**9 }}). BoundedSandbox adds:
- a budget of MAX_STEPS steps (loop iterations, calls, filters) and MAX_SECONDS seconds, checked at every step;
- a size check *before* every operation that can make its result much larger than its inputs (sequence * int, +, ~,
  integer * and **, % and format with widths, str methods and filters with widths or repeat counts, printing a
  container): checked after, the memory would be taken already;
- a budget of MAX_MADE characters for everything the template builds and writes (every result, every {% set %} /
  macro buffer), so that no repetition of allowed operations adds up to more, and a cap on the rendered text;
- no {% include %}, {% import %} or {% extends %}: a chat template is rendered alone, there is no other to load.
A breach raises BudgetError (a jinja2 SecurityError) saying which bound.
"""
from __future__ import annotations

import functools
import re
import time

from jinja2 import nodes, pass_context
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_SOURCE = 2**20     # characters of a template (real ones: a few thousand)
MAX_TEXT = 2**24       # characters of any one string a template builds, and of the rendered text
MAX_MADE = 2**27       # characters of everything a rendering builds and writes, all together
MAX_ITEMS = 2**17      # items of a list or tuple built by * or + (range() gives 100000 at most)
MAX_INT_BITS = 2**16   # bits of an integer built by * or **
MAX_STEPS = 10**6      # loop iterations, calls and filters of one rendering (a real template takes thousands)
MAX_SECONDS = 10.0     # of one rendering (a real one takes milliseconds)


class BudgetError(SecurityError):
    """A template went past one of the bounds above."""


def size(x) -> int:
    """About how many characters str(x) has, without making it: a container is looked at one level deep (see _item)."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, dict):
        x = [*x.keys(), *x.values()]
    if isinstance(x, (list, tuple, set, frozenset)):
        return 2 + sum(map(_item, x))
    return _item(x)


def _item(i) -> int:
    """Characters of repr(i) in a container, about: an inner container counts 8 per item."""
    if isinstance(i, str):
        return len(i) + 4
    if isinstance(i, int):
        return i.bit_length() // 3 + 3
    if isinstance(i, (list, tuple, dict, set, frozenset)):
        return 8 * len(i) + 4
    return 32


def _too_big(what: str, n: int, cap: int = MAX_TEXT, unit: str = "characters") -> None:
    if n > cap:
        raise BudgetError(f"{what} would make about {n} {unit}, over the {cap} a chat template may build at once")


def _format_size(fmt: str, values: list, fields: int) -> int:
    """Characters of fmt % values or fmt.format(*values) at most: `fields` fields, each as wide as the widest value
    plus the largest number in fmt or in values (a width: "%999999999s", "{:>{}}")."""
    width = max((int(d) if len(d) < 10 else 10**10 for d in re.findall(r"\d+", fmt)), default=0)
    ints = [abs(v) for v in values if isinstance(v, int)]
    return len(fmt) + fields * (max(map(size, values), default=0) + width + max(ints, default=0))


def _str_method(s: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Check a call of the str method `name` on s before it runs -> args (an iterable argument made a list)."""
    arg = lambda i, key, default=None: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    if name in ("center", "ljust", "rjust", "zfill"):
        width = arg(0, "width", 0)
        _too_big(f"str.{name}()", width if isinstance(width, int) else 0)
    elif name == "expandtabs":
        tab = arg(0, "tabsize", 8)
        _too_big("str.expandtabs()", len(s) + s.count("\t") * (tab if isinstance(tab, int) else 0))
    elif name == "replace" and isinstance(arg(0, "old"), str) and isinstance(arg(1, "new"), str):
        old, new, count = arg(0, "old"), arg(1, "new"), arg(2, "count", -1)
        n = s.count(old) if old else len(s) + 1
        _too_big("str.replace()", len(s) + min(n, count if isinstance(count, int) and count >= 0 else n) * len(new))
    elif name == "join" and args:
        items = list(args[0])  # a generator would be run by join itself, unchecked
        _too_big("str.join()", len(s) * len(items) + sum(map(size, items)))
        args = (items, *args[1:])
    elif name in ("format", "format_map"):
        values = [*args, *kwargs.values()] if name == "format" else list(args[0].values()) if args and \
            isinstance(args[0], dict) else []
        _too_big(f"str.{name}()", _format_size(s, values, s.count("{")))
    elif name == "translate" and args and isinstance(args[0], dict):
        _too_big("str.translate()", len(s) * max(map(size, args[0].values()), default=1))
    return args


def _filter_size(name: str, value, args: tuple, kwargs: dict) -> int:
    """Characters of the result at most, for the filters whose result can be much larger than their input."""
    arg = lambda i, key, default=None: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    text = lambda: str(value)  # noqa: E731 (size(value) was checked first: str() of it is bounded)
    if name == "indent":  # the width (a number or a string) repeated on every line
        width = arg(0, "width", 4)
        return size(value) + (text().count("\n") + 1) * (len(width) if isinstance(width, str) else int(width))
    if name == "wordwrap":  # wrapstring after every line, each line one character at least
        return size(value) * (1 + len(str(arg(2, "wrapstring") or "\n")))
    if name == "replace":
        old, new = str(arg(0, "old", "")), str(arg(1, "new", ""))
        return size(value) + (text().count(old) if old else size(value) + 1) * len(new)
    if name == "join":  # the separator between every two items
        return size(value) + len(str(arg(0, "d", ""))) * (len(value) if hasattr(value, "__len__") else 0)
    if name == "format":
        return _format_size(text(), [*args, *kwargs.values()], text().count("%"))
    return 0


def _bounded_filter(env: "BoundedSandbox", name: str, f):
    """The filter f, counted as a step and checked for size before it runs, its result counted as made."""
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # the context / environment Jinja passes first

    @functools.wraps(f)  # keeps jinja_pass_arg: Jinja still passes what f asks for
    def bounded(*args, **kwargs):
        env.step()
        value, rest = args[skip] if len(args) > skip else None, args[skip + 1:]
        if name == "join" and value is not None and not isinstance(value, (str, list, tuple, dict)):
            value = list(value)  # a generator: run here, so that its items are counted before joining them
            args = (*args[:skip], value, *rest)
        env.check_args(rest, kwargs)
        _too_big(f"the filter {name}'s input", size(value))
        _too_big(f"the filter {name}", _filter_size(name, value, rest, kwargs))
        result = f(*args, **kwargs)
        env.made(result)
        return result
    bounded.bounded = True
    return bounded


class _Buffer(list):
    """The output of a {% set %} block, a macro or a filter block, collected before it is joined: what is written
    into it is counted as made (a loop of literal text would otherwise build an unbounded string here)."""

    def __init__(self, env: "BoundedSandbox"):
        super().__init__()
        self.env = env

    def append(self, s) -> None:
        self.env.made(s)
        super().append(s)

    def extend(self, items) -> None:
        items = tuple(items)
        for s in items:
            self.env.made(s)
        super().extend(items)


class _CodeGenerator(CodeGenerator):
    """Jinja's compiler with the hooks the bounds need: loops count their steps, buffers count what they hold, `~`
    checks its size; and the tags that would load another template are refused."""

    def visit_Template(self, node: nodes.Template, frame=None) -> None:
        loads = {nodes.Extends: "extends", nodes.Include: "include", nodes.Import: "import",
                 nodes.FromImport: "from ... import"}
        for n in node.find_all(tuple(loads)):
            raise TemplateSyntaxError(f"{{% {loads[type(n)]} %}} is not allowed: a chat template is rendered alone, "
                                      f"there is no other template to load", n.lineno)
        for n in list(node.find_all(nodes.For)):  # every loop iteration is a step (BoundedSandbox.step)
            n.iter = nodes.Filter(n.iter, "_counted", [], [], None, None, lineno=n.lineno)
            n.iter.set_environment(self.environment)
        super().visit_Template(node, frame)

    def buffer(self, frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.new_buffer()")

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


@pass_context
def _counted(context, iterable):
    """A loop's iterable, one step per item."""
    step = context.environment.step
    for item in iterable:
        step()
        yield item


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with the bounds of the module docstring; render with render_text()."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kwargs):
        super().__init__(finalize=self._finalize, **kwargs)
        self.globals.pop("lipsum", None)  # n paragraphs of filler text: no chat template uses it, a hostile one might
        self.filters["_counted"] = _counted
        self.steps = self.made_chars = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def render_text(self, source: str, **variables) -> str:
        """Compile and render source with the bounds (the filters added since __init__ included)."""
        if len(source) > MAX_SOURCE:
            raise BudgetError(f"it is {len(source)} characters long, over the {MAX_SOURCE} a chat template may have")
        self.filters = {name: f if name == "_counted" or getattr(f, "bounded", False) else
                        _bounded_filter(self, name, f) for name, f in self.filters.items()}
        self.steps = self.made_chars = 0
        self.deadline = time.monotonic() + MAX_SECONDS
        out, n = [], 0
        for chunk in self.from_string(source).generate(**variables):
            n += len(chunk)
            _too_big("the rendered text", n)
            self.made(chunk)
            out.append(chunk)
        return "".join(out)

    # -- the bounds ------------------------------------------------------------------------------------------------
    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise BudgetError(f"it took over {MAX_STEPS} steps (loop iterations, calls and filters); a chat template "
                              f"needs far fewer: it loops for ever or is hostile")
        if time.monotonic() > self.deadline:
            raise BudgetError(f"it ran for over {MAX_SECONDS:g} s; a chat template takes milliseconds: it loops for "
                              f"ever or is hostile")

    def made(self, result) -> None:
        """Count a string or container the template built or wrote against MAX_MADE."""
        if isinstance(result, (str, list, tuple, dict)):
            self.made_chars += size(result)
            if self.made_chars > MAX_MADE:
                raise BudgetError(f"it built over {MAX_MADE} characters in all; a chat template needs far fewer")

    def check_args(self, args, kwargs) -> None:
        for v in (*args, *kwargs.values()):
            if isinstance(v, int) and abs(v) > MAX_TEXT:
                raise BudgetError(f"the argument {v} is out of bounds: a chat template may use sizes up to {MAX_TEXT}")

    # -- the hooks Jinja calls -------------------------------------------------------------------------------------
    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        __self.step()
        __self.check_args(args, kwargs)
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if isinstance(getattr(target, "__self__", None), str):
            args = _str_method(target.__self__, target.__name__, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        __self.made(result)
        return result

    def call_binop(self, context, operator: str, left, right):
        """The operators * ** + % (intercepted_binops), checked for the size of their result before they run."""
        seq, other = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
        cap = (MAX_TEXT, "characters") if isinstance(seq, str) else (MAX_ITEMS, "items")
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*" and ints:
            _too_big("the operator *", left.bit_length() + right.bit_length(), MAX_INT_BITS, "bits")
        elif operator == "*" and isinstance(seq, (str, list, tuple)) and isinstance(other, int):
            _too_big("the operator *", len(seq) * other, *cap)
        elif operator == "**" and ints and right > 0 and abs(left) > 1:
            _too_big("the operator **", left.bit_length() * right, MAX_INT_BITS, "bits")
        elif operator == "+" and type(left) is type(right) and isinstance(left, (str, list, tuple)):
            _too_big("the operator +", len(left) + len(right), *cap)
        elif operator == "%" and isinstance(left, str):
            values = list(right.values()) if isinstance(right, dict) else list(right) if isinstance(right, tuple) \
                else [right]
            _too_big("the operator %", _format_size(left, values, left.count("%")))
        result = super().call_binop(context, operator, left, right)
        self.made(result)
        return result

    def concat(self, parts: tuple) -> str:
        """`a ~ b ~ ...`: the parts as text, joined."""
        _too_big("the operator ~", sum(map(size, parts)))
        result = "".join(map(str, parts))
        self.made(result)
        return result

    def new_buffer(self) -> _Buffer:
        return _Buffer(self)

    def _finalize(self, value):
        """Every {{ value }} passes here before str(value): a container whose text would be too big is refused."""
        _too_big("printing a value", size(value))
        return value
