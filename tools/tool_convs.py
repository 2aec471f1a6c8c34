"""Tool-call conversations for the tiny model's training data, made compositionally.

The first data set had six fixed phrasings per tool and held out the last two; the model
learnt the templates (23/50 held-out requests right, `search` 0/8). Here a request is
composed from parts, so that what is learnt is the mapping from the request's words to the
tool (and to the words of the tool's description), not a list of sentences:

    request = [prefix] frame(core) [suffix]          e.g. "Hey, could you list the folder src?"
    core    = verb + object  (imperative: "list" + "the folder {dir}")
            | question        ("What files are in {dir}?")

with argument values drawn from composed pools (paths = folder x stem x extension, commands =
program x arguments, search queries = pattern x topic, ...), tool descriptions drawn from a
pool of paraphrases, distractor tools (send_email, get_time, delete_file, make_dir, ...: also
targets of some training conversations, so a tool's presence never says it is the one), sets
of 2-4 tools in a random order and a few system prompts.

Held out (split 1), as a disjoint *template family*: a hash of each frame, each verb+object
pair and each question holds about a quarter of them out; a held-out request uses a held-out
frame AND a held-out core, so no held-out sentence shape occurs in training, while every word
of it does (each verb, object and frame word is seen with other partners). Tool sets (the
sorted names) and argument values are held out by hash too. The descriptions are not held
out: they are the tools' own texts, the same in training and serving.
"""
import hashlib
import json

SPLIT_SALT = "ds4-tools-v2"


def held(key, percent):
    h = hashlib.sha1((SPLIT_SALT + "|" + key).encode()).hexdigest()
    return int(h[:8], 16) % 100 < percent


def tool(name, desc, props, required):
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": props, "required": required}}}


def S(d):
    return {"type": "string", "description": d}


# ---------------------------------------------------------------- tools and descriptions

# name -> (description paraphrases, properties, required). The first description is the
# canonical one (the first data set's).
TOOL_DEFS = {
    "read_file": (["Read a text file and return its contents", "Return the contents of a file",
                   "Open a file and read its text", "Read the file at the given path",
                   "Show what a text file contains"],
                  {"path": S("Path of the file")}, ["path"]),
    "list_dir": (["List the entries of a directory", "List the files in a folder",
                  "Show the contents of a directory", "Return the names of the files and "
                  "folders in a directory", "Enumerate a directory"],
                 {"path": S("Directory to list")}, ["path"]),
    "run_command": (["Run a shell command and return its output", "Execute a command line in "
                     "the shell", "Run a program and return what it prints",
                     "Execute a shell command", "Run a terminal command and capture its output"],
                    {"command": S("The command line to run")}, ["command"]),
    "get_weather": (["Get the current weather for a city", "Return the weather forecast for a "
                     "location", "Look up the temperature and conditions in a city",
                     "Current weather conditions for a place", "Get today's weather"],
                    {"location": S("The city name"),
                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                              "description": "Temperature unit"}}, ["location"]),
    "search": (["Search the web for information", "Search the internet and return results",
                "Look something up online", "Find web pages about a topic",
                "Query a web search engine"],
               {"query": S("Search query"),
                "num_results": {"type": "integer", "description": "Number of results"}},
               ["query"]),
    "write_file": (["Write text to a file", "Save text into a file, replacing its contents",
                    "Create or overwrite a file with the given text", "Store text in a file",
                    "Write content to a path on disk"],
                   {"path": S("Path of the file"), "content": S("Text to write")},
                   ["path", "content"]),
    # Distractors (also targets of some training conversations).
    "send_email": (["Send an email message", "Email someone", "Send a message by email"],
                   {"to": S("Recipient address"), "subject": S("Subject line")}, ["to", "subject"]),
    "get_time": (["Get the current time in a time zone", "Return the local time of a city",
                  "Tell the time somewhere"], {"timezone": S("City or time zone")}, ["timezone"]),
    "delete_file": (["Delete a file", "Remove a file from disk", "Erase the file at a path"],
                    {"path": S("Path of the file")}, ["path"]),
    "make_dir": (["Create a directory", "Make a new folder", "Create a folder at a path"],
                 {"path": S("Directory to create")}, ["path"]),
    "calculate": (["Evaluate an arithmetic expression", "Do a calculation",
                   "Compute the value of a math expression"],
                  {"expression": S("The expression")}, ["expression"]),
    "translate": (["Translate text into another language", "Translate a sentence",
                   "Translate words between languages"],
                  {"text": S("Text to translate"), "target_language": S("Language to translate into")},
                  ["text", "target_language"]),
}
MAIN = ["read_file", "list_dir", "run_command", "get_weather", "search", "write_file"]
EXTRA = [n for n in TOOL_DEFS if n not in MAIN]


def tool_schema(name, rng):
    descs, props, req = TOOL_DEFS[name]
    d = descs[0] if rng.random() < 0.3 else rng.choice(descs)
    return tool(name, d, props, req)


# ---------------------------------------------------------------- argument values

def cross(*parts):
    out = [""]
    for p in parts:
        out = [a + b for a in out for b in p]
    return out


FILE_DIRS = ["", "src/", "docs/", "tests/", "app/", "lib/", "scripts/", "config/", "data/", "notes/",
             "/etc/", "/tmp/", "~/", "build/", "web/", "tools/", "examples/", "include/"]
STEMS = ["main", "README", "notes", "config", "setup", "index", "util", "server", "client", "todo",
         "report", "input", "output", "app", "models", "views", "test_app", "CHANGELOG", "hosts",
         "settings", "parser", "routes", "schema", "budget", "letter", "draft", "summary", "log",
         "errors", "results", "users", "style", "api", "helpers", "core", "plan"]
EXTS = [".py", ".c", ".md", ".txt", ".json", ".toml", ".yaml", ".sh", ".js", ".go", ".rs", ".csv",
        ".log", ".ini", ".h", ".html", ".css", ".cfg"]
DIR_BASES = [".", "src", "tests", "docs", "/tmp", "/var/log", "scripts", "app", "lib", "data",
             "build", "~/projects", "/etc", "/usr/local/bin", "~/Downloads", "~/Documents", "assets",
             "config", "vendor", "bin", "static", "templates", "examples", "/home/ana", "include",
             "notebooks", "out", "web", "tools", "media"]
DIR_SUBS = ["", "", "/old", "/images", "/v2", "/backup", "/logs", "/drafts"]
COMMANDS = cross(["ls", "ls -la", "ls -l"], ["", " /tmp", " src"]) + cross(
    ["git "], ["status", "diff", "branch", "log --oneline -5", "log -3", "pull", "stash list",
               "remote -v", "show HEAD"]) + cross(
    ["make", "make test", "make clean", "make all", "make install"]) + cross(
    ["python3 "], ["--version", "main.py", "-m pytest", "setup.py build", "-V"]) + [
    "pytest -q", "pytest", "npm test", "npm install", "npm run build", "cargo build", "cargo test",
    "go test ./...", "go build", "df -h", "du -sh .", "uname -a", "pwd", "date", "whoami", "uptime",
    "free -m", "ps aux", "hostname", "id", "env", "echo hello", "grep -r TODO .", "wc -l *.py",
    "docker ps", "ping -c 1 localhost", "node --version", "gcc --version", "top -b -n 1",
    "ls ~", "which python3", "ip addr", "lsblk", "cmake ..", "ninja", "tail -n 20 app.log"]
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Beijing", "Cairo", "Lima", "Oslo",
          "Sydney", "Toronto", "Mumbai", "Seoul", "Lagos", "Vienna", "Dublin", "Prague", "Lisbon",
          "Athens", "Chicago", "Boston", "Denver", "Nairobi", "Bangkok", "Hanoi", "Jakarta", "Manila",
          "Istanbul", "Moscow", "Warsaw", "Budapest", "Zurich", "Geneva", "Milan", "Naples", "Munich",
          "Hamburg", "Amsterdam", "Brussels", "Stockholm", "Helsinki", "Copenhagen", "Reykjavik",
          "Montreal", "Vancouver", "Seattle", "Miami", "Havana", "Bogota", "Quito", "Santiago",
          "Buenos Aires", "Sao Paulo", "Cape Town", "Casablanca", "Tunis", "Dubai", "Tehran",
          "Karachi", "Delhi", "Dhaka", "Singapore", "Osaka", "Kyoto", "Shanghai", "Melbourne",
          "Auckland", "New York", "Los Angeles", "San Francisco", "Mexico City"]
TOPICS = ["Unix", "the Roman empire", "black holes", "Python decorators", "TCP", "photosynthesis",
          "the French revolution", "quantum computing", "volcanoes", "the Moon landing", "jazz",
          "chess openings", "hash tables", "the Rust language", "vaccines", "climate change",
          "the printing press", "bees", "the stock market", "neural networks", "the Nile",
          "Mount Everest", "the Olympic games", "electric cars", "coffee", "the Linux kernel",
          "sourdough bread", "the Great Wall", "solar panels", "dinosaurs", "SQL joins",
          "the human heart", "Shakespeare", "tea", "the Internet", "whales", "glaciers",
          "the periodic table", "origami", "compilers", "the Amazon rainforest", "bitcoin"]
QUERY_PATTERNS = ["{t}", "the history of {t}", "how {t} works", "facts about {t}",
                  "the latest news on {t}", "an introduction to {t}", "who invented {t}",
                  "{t} for beginners", "the best books about {t}", "why {t} matters"]
CONTENTS = ["hello world", "TODO: fix the tests", "done", "version 1.2.0", "meeting at noon", "ok",
            "buy milk", "release notes", "call Sam tomorrow", "build passed", "draft 2", "DEBUG=1",
            "port = 8080", "shopping list: eggs, bread", "remember the backup", "v0.9 beta",
            "name: demo", "# Title", "print('hi')", "see you soon", "42", "first line",
            "pending review", "ship it"]
EMAILS = cross(["ana", "bob", "li", "sam", "team", "omar", "mei", "jo"], ["@example.com", "@example.org"])
SUBJECTS = ["the meeting", "the report", "lunch", "the release", "my holiday", "the budget",
            "tomorrow's call", "the contract", "the party", "the bug"]
EXPRS = ["2 + 2", "12 * 7", "100 / 4", "3 ** 5", "17 - 9", "(4 + 5) * 3", "81 / 9", "2 ** 10",
         "1234 + 5678", "15 * 15", "7 * 8 - 6", "99 / 3"]
LANGS = ["French", "German", "Spanish", "Italian", "Japanese", "Chinese", "Portuguese", "Dutch"]
PHRASES = ["good morning", "thank you", "where is the station", "I like tea", "see you later",
           "how much is it", "the cat sleeps", "happy birthday"]


def value_pools():
    """{kind: (training values, held-out values)}: a hash of the value holds 20% out."""
    raw = {"path": cross(FILE_DIRS, STEMS, EXTS), "dir": cross(DIR_BASES, DIR_SUBS),
           "command": COMMANDS, "city": CITIES,
           "query": [p.format(t=t) for p in QUERY_PATTERNS for t in TOPICS],
           "content": CONTENTS, "email": EMAILS, "subject": SUBJECTS, "expr": EXPRS,
           "lang": LANGS, "phrase": PHRASES}
    out = {}
    for k, vals in raw.items():
        vals = sorted(set(v for v in vals if v))
        tr = [v for v in vals if not held(k + ":" + v, 20)]
        ho = [v for v in vals if held(k + ":" + v, 20)]
        out[k] = (tr, ho or tr)
    return out


VALUES = value_pools()


def make_args(name, rng, split):
    pick = lambda k: rng.choice(VALUES[k][split])
    if name == "read_file" or name == "delete_file":
        return {"path": pick("path")}
    if name == "list_dir" or name == "make_dir":
        return {"path": pick("dir")}
    if name == "run_command":
        return {"command": pick("command")}
    if name == "get_weather":
        a = {"location": pick("city")}
        if rng.random() < 0.35:
            a["unit"] = rng.choice(["celsius", "fahrenheit"])
        return a
    if name == "search":
        a = {"query": pick("query")}
        if rng.random() < 0.25:
            a["num_results"] = rng.choice([3, 5, 10, 20])
        return a
    if name == "write_file":
        return {"path": pick("path"), "content": pick("content")}
    if name == "send_email":
        return {"to": pick("email"), "subject": pick("subject")}
    if name == "get_time":
        return {"timezone": pick("city")}
    if name == "calculate":
        return {"expression": pick("expr")}
    return {"text": pick("phrase"), "target_language": pick("lang")}


# ---------------------------------------------------------------- request phrasings

# Imperative cores: verbs x objects ({x} is the main argument, as the user writes it).
VERBS = {
    "read_file": ["read", "open", "show me", "display", "print", "view", "look at", "check",
                  "fetch", "output", "get", "load", "go through", "read out"],
    "list_dir": ["list", "show me", "display", "enumerate", "print", "give me", "browse", "scan",
                 "look through", "get"],
    "run_command": ["run", "execute", "launch", "invoke", "start", "try", "perform", "call",
                    "kick off", "fire off"],
    "get_weather": ["check", "get", "tell me", "look up", "find", "report", "give me", "fetch",
                    "show me"],
    "search": ["search for", "look up", "find", "google", "research", "search the web for",
               "find out about", "dig up", "look for", "browse the web for", "search online for",
               "hunt for"],
    "write_file": ["write", "save", "store", "put", "record", "place", "dump", "write down"],
    "send_email": ["send", "email", "mail", "write"],
    "get_time": ["tell me", "check", "get", "look up"],
    "delete_file": ["delete", "remove", "erase", "get rid of", "trash"],
    "make_dir": ["create", "make", "set up", "add"],
    "calculate": ["calculate", "compute", "work out", "evaluate"],
    "translate": ["translate", "render", "convert"],
}
OBJECTS = {
    "read_file": ["{x}", "the file {x}", "the contents of {x}", "the text of {x}", "file {x}",
                  "what {x} says", "{x} and return its contents", "the text file {x}",
                  "what is written in {x}", "the lines of {x}"],
    "list_dir": ["the directory {x}", "the folder {x}", "the entries of {x}", "the files in {x}",
                 "what is inside the directory {x}", "the contents of the folder {x}",
                 "everything in the directory {x}", "the files and folders in {x}",
                 "a listing of {x}", "the entries of the directory {x}"],
    "run_command": ["`{x}`", "the command {x}", "{x} in the shell", "the shell command `{x}`",
                    "`{x}` in a terminal", "{x}", "the command line {x}", "`{x}` and show the output",
                    "the program `{x}`", "`{x}` and return its output"],
    "get_weather": ["the weather in {x}", "the weather for {x}", "the temperature in {x}",
                    "the forecast for {x}", "the current weather in {x}",
                    "today's weather in {x}", "the conditions in {x}", "how warm it is in {x}",
                    "whether it rains in {x}", "the weather forecast for {x}"],
    "search": ["{x}", "information about {x}", "info on {x}", "{x} on the web", "{x} online",
               "web pages about {x}", "articles on {x}", "results about {x}", "anything on {x}",
               "sources on {x}"],
    "write_file": ["'{c}' to {x}", "the text '{c}' into {x}", "'{c}' in the file {x}",
                   "'{c}' into {x}", "the line '{c}' to {x}", "'{c}' as the content of {x}",
                   "the words '{c}' in {x}", "'{c}' to the file {x}"],
    "send_email": ["an email to {x} about {s}", "{x} a message about {s}", "a mail to {x} about {s}",
                   "{x} about {s}"],
    "get_time": ["the time in {x}", "the local time in {x}", "what time it is in {x}",
                 "the current time in {x}"],
    "delete_file": ["{x}", "the file {x}", "the file at {x}"],
    "make_dir": ["the directory {x}", "a folder {x}", "a new directory {x}", "the folder {x}"],
    "calculate": ["{x}", "the value of {x}", "what {x} is", "the result of {x}"],
    "translate": ["'{p}' into {l}", "the phrase '{p}' to {l}", "'{p}' in {l}"],
}
QUESTIONS = {
    "read_file": ["What is in {x}?", "What does {x} say?", "What does the file {x} contain?",
                  "What's inside {x}?", "Can I see {x}?", "What are the contents of {x}?",
                  "What text is in {x}?", "How does {x} read?"],
    "list_dir": ["What files are in {x}?", "What is inside the folder {x}?",
                 "Which entries does {x} have?", "What does the directory {x} contain?",
                 "What's in the folder {x}?", "Which files live in {x}?",
                 "How many files are in the directory {x}?", "What can I find in the directory {x}?"],
    "run_command": ["What does `{x}` print?", "What is the output of {x}?",
                    "What happens if you run {x}?", "What does the command {x} say?",
                    "What do I get from `{x}`?", "What output does {x} give?",
                    "Does `{x}` work?", "What does {x} return in the shell?"],
    "get_weather": ["What's the weather in {x}?", "How is the weather in {x} today?",
                    "Is it warm in {x} right now?", "Is it raining in {x}?",
                    "How cold is it in {x}?", "Will it be sunny in {x}?",
                    "Should I take an umbrella in {x}?", "What is the temperature in {x}?",
                    "How hot is it in {x}?", "Is it snowing in {x}?"],
    "search": ["What can you find online about {x}?", "What does the web say about {x}?",
               "Can you find anything about {x}?", "What are some good sources on {x}?",
               "Is there information online about {x}?", "What do web pages say about {x}?",
               "Where can I read about {x}?", "Any articles on {x}?"],
    "write_file": ["Can {x} contain '{c}'?", "Could {x} say '{c}'?",
                   "Can you make {x} say '{c}'?", "Can you create {x} containing '{c}'?"],
    "send_email": ["Can you email {x} about {s}?", "Could you send {x} a note about {s}?"],
    "get_time": ["What time is it in {x}?", "What's the local time in {x}?",
                 "Is it morning in {x} now?"],
    "delete_file": ["Can you delete {x}?", "Could you remove the file {x}?"],
    "make_dir": ["Can you create a folder called {x}?", "Could you make the directory {x}?"],
    "calculate": ["What is {x}?", "How much is {x}?"],
    "translate": ["How do you say '{p}' in {l}?", "What is '{p}' in {l}?"],
}
IMP_FRAMES = ["{c}.", "Please {c}.", "{c}, please.", "Could you {c}?", "Can you {c}?",
              "Can you {c} for me?", "Would you {c}?", "I need you to {c}.", "I'd like you to {c}.",
              "I want you to {c}.", "Go ahead and {c}.", "Kindly {c}.", "Help me {c}.", "Hey, {c}.",
              "Quick task: {c}.", "Do me a favour and {c}.", "Please {c} now.",
              "{c} when you get a chance.", "Hi! Could you please {c}?", "Your task: {c}.",
              "{c} for me, thanks.", "I'd appreciate it if you could {c}.", "Next, {c}.",
              "First, {c}.", "Could you please {c}?", "Can you please {c}?", "Let's {c}.",
              "Time to {c}.", "Just {c}.", "Would you be able to {c}?", "Is it possible to {c}?",
              "I would like you to {c}.", "Please {c} and tell me what you get.", "Now {c}.",
              "Hello, please {c}.", "One thing: {c}.", "Could you quickly {c}?", "{c} right away.",
              "Would you kindly {c}?", "Can you {c}, please?"]
Q_FRAMES = ["{q}", "Quick question: {q}", "Hi, {q}", "Hey! {q}", "{q} Thanks.", "Hello. {q}",
            "{q} Please check.", "Tell me: {q}", "I wonder: {q}", "So, {q}", "Question: {q}",
            "{q} Thank you!", "Hi there. {q}", "Help me out: {q}", "{q} I need to know.",
            "Sorry to bother you. {q}", "Hey, {q}", "Hello, {q}", "OK, {q}", "{q} Just curious.",
            "Another one: {q}", "Please tell me. {q}", "{q} Can you check?", "Good evening. {q}"]
PREFIXES = ["I'm working on a project. ", "I have a question. ", "Good morning! ", "Hello! ",
            "Thanks for the help so far. ", "One more thing. ", "OK. ", "I'm in a hurry. "]
SUFFIXES = [" Thanks!", " Thank you.", " Cheers.", " That would help a lot.", " No rush."]


def extra_phrase(name, args, rng):
    """The words a request adds for an optional argument (unit, number of results)."""
    if name == "get_weather" and "unit" in args:
        return rng.choice([" in %s", ", in %s", " (in %s)", " in degrees %s"]) % args["unit"]
    if name == "search" and "num_results" in args:
        return rng.choice([" and give me %d results", ", top %d results", " (%d results)",
                           ", %d results please"]) % args["num_results"]
    return ""


def cores(name):
    """Every core of a tool: ("imp", verb + object) and ("q", question)."""
    return ([("imp", v + " " + o) for v in VERBS[name] for o in OBJECTS[name]] +
            [("q", q) for q in QUESTIONS[name]])


# split -> name -> cores; frames per split. A held-out request uses held-out parts only.
# The bare frames ("{c}.", "{q}") always train: they are the plainest request of all.
CORES = {s: {n: [c for c in cores(n) if held("core:" + n + ":" + c[1], 25) == bool(s)]
             for n in TOOL_DEFS} for s in (0, 1)}
FRAMES = {s: {"imp": [f for f in IMP_FRAMES
                      if (held("imp:" + f, 25) and f != "{c}.") == bool(s)],
              "q": [f for f in Q_FRAMES if (held("q:" + f, 25) and f != "{q}") == bool(s)]}
          for s in (0, 1)}


def fill(text, name, args):
    if name == "write_file":
        return text.replace("{x}", args["path"]).replace("{c}", args["content"])
    if name == "send_email":
        return text.replace("{x}", args["to"]).replace("{s}", args["subject"])
    if name == "translate":
        return text.replace("{p}", args["text"]).replace("{l}", args["target_language"])
    main = {"read_file": "path", "delete_file": "path", "list_dir": "path", "make_dir": "path",
            "run_command": "command", "get_weather": "location", "search": "query",
            "get_time": "timezone", "calculate": "expression"}[name]
    return text.replace("{x}", str(args[main]))


def request(name, args, rng, split):
    kind, core = rng.choice(CORES[split][name])
    core = fill(core, name, args)
    extra = extra_phrase(name, args, rng)
    if kind == "imp":
        frame = rng.choice(FRAMES[split]["imp"])
        text = frame.replace("{c}", core + extra)
    else:
        if extra:
            core = core[:-1] + extra + core[-1]
        frame = rng.choice(FRAMES[split]["q"])
        if frame.split("{q}")[0].endswith((", ", ": ")):
            core = core[0].lower() + core[1:]   # "Hi, what is in notes.txt?"
        text = frame.replace("{q}", core)
    text = text[0].upper() + text[1:]
    if rng.random() < 0.15:
        text = rng.choice(PREFIXES) + text
    if rng.random() < 0.1:
        text += rng.choice(SUFFIXES)
    if rng.random() < 0.08:
        text = text.lower().rstrip(".?!")
    return text


# ---------------------------------------------------------------- the conversation

def fake_result(name, args, rng):
    if name == "read_file":
        return "# %s\n\nThis file has %d lines. The first one says: hello." % (
            args["path"], rng.randint(3, 200))
    if name == "list_dir":
        return "\n".join(rng.sample(["main.c", "README.md", "util.py", "a.txt", "build", "Makefile",
                                     "x.json", "notes.md", "img", "test.py"], 4))
    if name == "run_command":
        return "exit status 0\n" + rng.choice(["ok", "3 files changed", "all tests passed", "Linux",
                                               "12:00", "nothing to commit"])
    if name == "get_weather":
        unit = args.get("unit", "celsius")
        t = rng.randint(-5, 35) if unit == "celsius" else rng.randint(25, 95)
        return json.dumps({"temperature": t, "unit": unit,
                           "condition": rng.choice(["sunny", "cloudy", "rain", "snow", "windy"])})
    if name == "search":
        return json.dumps({"results": [{"title": "About " + args["query"],
                                        "url": "https://example.org/%d" % rng.randint(1, 99)}]})
    if name == "write_file":
        return json.dumps({"written": len(args["content"]), "path": args["path"]})
    if name == "send_email":
        return json.dumps({"sent": True, "to": args["to"]})
    if name == "get_time":
        return json.dumps({"time": "%02d:%02d" % (rng.randint(0, 23), rng.randint(0, 59))})
    if name == "calculate":
        return json.dumps({"value": rng.randint(1, 9999)})
    if name == "translate":
        return json.dumps({"translation": "(%s) %s" % (args["target_language"], args["text"])})
    return json.dumps({"ok": True, "path": args["path"]})


def final_answer(name, args, result):
    if name == "get_weather":
        r = json.loads(result)
        return "In %s it is %s and %d degrees %s." % (args["location"], r["condition"],
                                                       r["temperature"], r["unit"])
    if name == "read_file":
        return "Here is what %s contains: %s" % (args["path"], result.split("\n")[-1])
    if name == "list_dir":
        return "%s contains: %s." % (args["path"], ", ".join(result.split("\n")))
    if name == "run_command":
        return "I ran `%s`. It finished with %s" % (
            args["command"], result.replace("\n", ", output: ") + ".")
    if name == "search":
        return "I searched for %s. The top result is \"About %s\"." % (args["query"], args["query"])
    if name == "write_file":
        return "Done: I wrote %d characters to %s." % (len(args["content"]), args["path"])
    return "Done. The %s tool returned: %s" % (name, result)


THOUGHTS = ["The user wants something the {n} tool does. I will call it with {a}.",
            "This is a job for the {n} tool. I will call it with {a}.",
            "The {n} tool fits this request. I will call it with {a}."]


def thought(name, args, rng):
    a = ", ".join("%s %s" % kv for kv in args.items())
    return rng.choice(THOUGHTS).replace("{n}", name).replace("{a}", a)


def tool_set(name, rng, split):
    """The target and 1-3 others (main tools and distractors), in a random order; the sorted
    set is held out by hash (20%)."""
    others_pool = [t for t in TOOL_DEFS if t != name]
    for _ in range(200):
        others = rng.sample(others_pool, rng.choice([1, 2, 2, 3, 3]))
        names = sorted(others + [name])
        if held("set:" + "|".join(names), 20) == bool(split):
            rng.shuffle(names)
            return names
    return [name]


SYSTEMS = ["You are a helpful assistant.", "You are a coding assistant with access to tools.",
           "You are a careful assistant. Use a tool when it helps.", "You are an assistant with tools.",
           "Answer the user. Call a tool when one is needed.", "You help people with files, "
           "commands and questions.", "You are a friendly assistant."]


def tool_conversation(rng, split, think, name=None):
    """(conversation for --render-chat, eval record). Training targets: the six main tools
    three times in four, a distractor otherwise; held-out ones: `name`, a main tool."""
    if name is None:
        name = rng.choice(MAIN) if rng.random() < 0.75 else rng.choice(EXTRA)
    args = make_args(name, rng, split)
    user = request(name, args, rng, split)
    names = tool_set(name, rng, split)
    result = fake_result(name, args, rng)
    call = {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": name, "arguments": json.dumps(args)}}]}
    done = {"role": "assistant", "content": final_answer(name, args, result)}
    if think:
        call["reasoning_content"] = thought(name, args, rng)
        done["reasoning_content"] = "I have the result of %s. I will summarise it." % name
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}, {"role": "user", "content": user},
            call, {"role": "tool", "tool_call_id": "call_1", "content": result}, done]
    tools = [tool_schema(n, rng) for n in names]
    return {"messages": msgs, "tools": tools}, {"tool": name, "arguments": args, "user": user}


def counts():
    """How many distinct request shapes each split has (for stats.json)."""
    out = {}
    for s in (0, 1):
        n = 0
        for name in TOOL_DEFS:
            for kind, _ in CORES[s][name]:
                n += len(FRAMES[s][kind])
        out["train" if s == 0 else "heldout"] = n
    return out
