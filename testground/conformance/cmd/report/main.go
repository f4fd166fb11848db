// report turns a driver run into docs/conformance.md.
//
//	report -plan tests.json -events events.json -out conformance.md [-header header.md]
//
// tests.json is the driver's plan per test; events.json the `go tool test2json` stream of the
// driver. Exits 3 when a test that was run (or the stock Setup) failed or has no result.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"

	driver "picotun.dev/testground/conformance"
)

type event struct {
	Action  string
	Test    string
	Output  string
	Elapsed float64
}

type node struct {
	name    string // full test name
	result  string // pass, fail, skip or ""
	elapsed float64
	output  []string
}

var (
	// "    helpers.go:1318: 2026-08-01T10:00:00.1234Z: text" (tlog) or "    file.go:12: text" (t.Log).
	logLine  = regexp.MustCompile(`^\s*([\w.-]+\.go:\d+): (?:(\d{4}-\d\d-\d\dT[^ ]+): )?(.*)$`)
	testify  = regexp.MustCompile(`^\s*(Error Trace|Error|Test|Messages):\s*(.*)$`)
	contLine = regexp.MustCompile(`^\s{8,}\t?\s*(.*)$`)
)

func main() {
	planPath := flag.String("plan", "tests.json", "")
	eventsPath := flag.String("events", "events.json", "")
	outPath := flag.String("out", "conformance.md", "")
	headerPath := flag.String("header", "", "markdown put after the title (how it was run)")
	flag.Parse()

	var plan []driver.TestEntry
	data, err := os.ReadFile(*planPath)
	if err == nil {
		err = json.Unmarshal(data, &plan)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "report: the plan %s: %v\n", *planPath, err)
	}

	nodes := map[string]*node{}
	var order []string
	get := func(name string) *node {
		n, ok := nodes[name]
		if !ok {
			n = &node{name: name}
			nodes[name] = n
			order = append(order, name)
		}
		return n
	}
	var stray []string // output outside any test: a crash of the binary shows here
	if f, err := os.Open(*eventsPath); err == nil {
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 16<<20)
		for sc.Scan() {
			var e event
			line := sc.Bytes()
			if json.Unmarshal(line, &e) != nil {
				// test2json at times loses the tail of a long output line, running the next
				// event into it: keep that next event.
				i := bytes.LastIndex(line, []byte(`{"Time":`))
				if i <= 0 || json.Unmarshal(line[i:], &e) != nil {
					continue
				}
			}
			if e.Test == "" {
				if e.Action == "output" {
					stray = append(stray, strings.TrimRight(e.Output, "\n"))
				}
				continue
			}
			n := get(e.Test)
			switch e.Action {
			case "output":
				n.output = append(n.output, strings.TrimRight(e.Output, "\n"))
			case "pass", "fail", "skip":
				n.result, n.elapsed = e.Action, e.Elapsed
			}
		}
		f.Close()
	} else {
		fmt.Fprintf(os.Stderr, "report: %v\n", err)
	}

	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	top := driver.TopTest + "/"
	failed := 0

	w("# Gateway API conformance\n\n")
	w("<!-- Written by scripts/conformance (testground/conformance/cmd/report); do not edit by hand. -->\n\n")
	if *headerPath != "" {
		if h, err := os.ReadFile(*headerPath); err == nil {
			w("%s\n", strings.TrimSpace(string(h)))
		}
	}

	var run, skipped, notClaimed []driver.TestEntry
	for _, e := range plan {
		switch e.Plan {
		case "run":
			run = append(run, e)
		case "skipped":
			skipped = append(skipped, e)
		default:
			notClaimed = append(notClaimed, e)
		}
	}
	passed := 0
	for _, e := range run {
		if n := nodes[top+e.Name]; n != nil && n.result == "pass" {
			passed++
		}
	}
	setup := nodes[top+"Setup"]
	setupResult := "no result"
	if setup != nil && setup.result != "" {
		setupResult = map[string]string{"pass": "passed", "fail": "failed", "skip": "skipped"}[setup.result]
	}
	if setupResult != "passed" {
		failed++
	}

	w("\n## Summary\n\n")
	w("- Stock Setup (every base Gateway Accepted and Programmed, every pod Ready): **%s**\n", setupResult)
	w("- Status/validation tests run: %d, **%d passed, %d failed**\n", len(run), passed, len(run)-passed)
	w("- Tests skipped by name (traffic tests, and status tests picotun answers differently on purpose or this ground cannot set up): %d; subtests of run tests skipped by name: %d\n", len(skipped), len(driver.SkipSubtests))
	w("- Tests for features picotun does not claim (not run by the suite): %d\n", len(notClaimed))

	if setup != nil && setupResult != "passed" {
		w("\n## Setup\n\n")
		why, observed := whyFailed(nodes, order, setup.name)
		w("The suite's own Setup %s: %s", setupResult, code(why))
		if observed != "" {
			w(" -- last observed: %s", code(observed))
		}
		w(".\nThe driver went on with the base manifests applied and their pods Ready (the Setup's wait " +
			"without the Gateway half), and ran the tests through `suite.Run`; each test then says what its " +
			"Gateways lack.\n")
	}

	w("\n## Status/validation tests\n\n")
	w("| test | result | first failure (subtest: message; the state last observed is in [the details](#failures-in-detail)) |\n|---|---|---|\n")
	for _, e := range run {
		n := nodes[top+e.Name]
		result, why := "no result", "the driver stopped before this test"
		if n != nil && n.result != "" {
			result, why = n.result, ""
		} else if n != nil && !isLeafFailure(nodes, order, n.name) {
			result = "fail" // its own end event is missing, a subtest's failure is not
		}
		switch result {
		case "pass":
			result = "passed"
			if len(driver.SubtestsSkipped(e.Name)) > 0 {
				why = "subtests skipped (below)"
			}
		case "fail":
			result = "**failed**"
			why, _ = whyFailed(nodes, order, n.name)
		case "skip":
			result = "skipped"
			why = lastLine(n.output)
		}
		if result != "passed" && result != "skipped" {
			failed++
		}
		w("| %s | %s | %s |\n", e.Name, result, cell(why))
	}

	w("\n## Tests skipped by name\n\n")
	w("| test | reason |\n|---|---|\n")
	for _, e := range skipped {
		w("| %s | [%s](#reasons) |\n", e.Name, driver.ReasonKey(e.Reason))
	}
	w("\n### Subtests of run tests, skipped by name\n\n")
	w("| test | subtest | reason |\n|---|---|---|\n")
	for _, s := range driver.SkipSubtests {
		w("| %s | %s | [%s](#reasons) |\n", s.Test, cell(strings.Join(s.Path, " / ")), driver.ReasonKey(s.Reason))
	}
	w("\n### Reasons\n\n")
	for _, r := range driver.Reasons {
		w("- **%s**: %s.\n", r.Key, r.Text)
	}

	w("\n## Not claimed\n\n")
	w("Tests of features outside Gateway, HTTPRoute and ReferenceGrant; the suite reports them as not supported.\n\n")
	w("| test | features not claimed |\n|---|---|\n")
	sort.Slice(notClaimed, func(i, j int) bool { return notClaimed[i].Name < notClaimed[j].Name })
	for _, e := range notClaimed {
		w("| %s | %s |\n", e.Name, strings.Join(e.Missing, ", "))
	}

	// The driver's hook logs, after each failed test, the Gateways left in the suite's namespace.
	states := map[string][]string{}
	for _, name := range order {
		for _, l := range nodes[name].output {
			if m := logLine.FindStringSubmatch(l); m != nil {
				if test, text, ok := strings.Cut(m[3], ": "); ok && strings.HasPrefix(test, driver.StatePrefix) {
					test = strings.TrimPrefix(test, driver.StatePrefix)
					states[test] = append(states[test], text)
				}
			}
		}
	}

	// Every failing subtest, for the people fixing the controller.
	w("\n## Failures in detail\n\n")
	w("Per failing subtest: the suite's message and the last state its wait logged. Then, per failed test\n" +
		"whose subtests are not parallel, the status the driver read when it failed (before the test's cleanup):\n" +
		"its HTTPRoutes, and the Gateways of gateway-conformance-infra where they differ from the previous dump.\n\n")
	any := false
	for _, name := range order {
		n := nodes[name]
		if n.result != "fail" || !isLeafFailure(nodes, order, name) {
			continue
		}
		any = true
		msg, observed := failureOf(n)
		w("- `%s`: %s", strings.TrimPrefix(name, top), code(msg))
		if observed != "" {
			w("\n  last observed: %s", code(clip(observed, 1200)))
		}
		w("\n")
	}
	lastGateway := map[string]string{}
	for _, e := range run {
		st := states[e.Name]
		if len(st) == 0 {
			continue
		}
		w("\n`%s` when it failed:\n\n", e.Name)
		for _, l := range st {
			if name, ok := strings.CutPrefix(l, "Gateway "); ok {
				name, _, _ = strings.Cut(name, ":")
				if lastGateway[name] == l {
					continue
				}
				lastGateway[name] = l
			}
			w("- %s\n", code(clip(l, 900)))
		}
	}
	if !any {
		w("None.\n")
	}
	if len(stray) > 0 {
		for _, l := range stray {
			if strings.HasPrefix(l, "panic:") || strings.Contains(l, "test timed out") {
				w("\nThe driver binary stopped: `%s`\n", l)
				failed++
				break
			}
		}
	}

	if err := os.WriteFile(*outPath, []byte(b.String()), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
	fmt.Printf("setup=%s run=%d passed=%d failed=%d skipped=%d subtests_skipped=%d not_claimed=%d\n",
		setupResult, len(run), passed, len(run)-passed, len(skipped), len(driver.SkipSubtests), len(notClaimed))
	if failed > 0 {
		os.Exit(3)
	}
}

func isLeafFailure(nodes map[string]*node, order []string, name string) bool {
	for _, other := range order {
		if strings.HasPrefix(other, name+"/") && nodes[other].result == "fail" {
			return false
		}
	}
	return true
}

// whyFailed: the first failing leaf at or below name, its message and last observed state,
// prefixed with the subtest path below name.
func whyFailed(nodes map[string]*node, order []string, name string) (string, string) {
	for _, other := range order {
		if (other == name || strings.HasPrefix(other, name+"/")) && nodes[other].result == "fail" && isLeafFailure(nodes, order, other) {
			msg, observed := failureOf(nodes[other])
			if sub := strings.TrimPrefix(strings.TrimPrefix(other, name), "/"); sub != "" {
				msg = strings.ReplaceAll(sub, "_", " ") + ": " + msg
			}
			return msg, observed
		}
	}
	return "failed (no message)", ""
}

// failureOf reads a test's output: testify's Messages and Error, else the first non-log line
// of the failure; and the last log line before it (the state the wait last saw).
func failureOf(n *node) (string, string) {
	var observed, errText, messages, plain string
	field := ""
	inBlock := false
	for _, l := range n.output {
		if strings.HasPrefix(strings.TrimSpace(l), "=== ") || strings.HasPrefix(strings.TrimSpace(l), "--- ") {
			continue
		}
		if m := testify.FindStringSubmatch(l); m != nil {
			inBlock = true
			field = m[1]
			switch field {
			case "Error":
				if errText == "" {
					errText = m[2]
				}
			case "Messages":
				if messages == "" {
					messages = m[2]
				}
			}
			continue
		}
		if inBlock {
			if m := contLine.FindStringSubmatch(l); m != nil && !logLine.MatchString(l) {
				if field == "Error" && messages == "" && strings.TrimSpace(m[1]) != "" && !strings.Contains(errText, m[1]) {
					errText += " " + strings.TrimSpace(m[1])
				}
				continue
			}
			if messages != "" || errText != "" {
				break // the first failure only
			}
		}
		if m := logLine.FindStringSubmatch(l); m != nil {
			text := strings.TrimSpace(m[3])
			if text == "" || strings.HasPrefix(text, driver.StatePrefix) {
				continue // the line before a testify block
			}
			if m[2] != "" { // tlog: a wait's progress (the suite's own lines say what runs, not what it saw)
				file := m[1][:strings.IndexByte(m[1], ':')]
				if file != "suite.go" && file != "apply.go" && file != "conformance.go" && text != "Conditions matched expectations" &&
					!strings.Contains(text, "context deadline exceeded") {
					observed = text
				}
				continue
			}
			if plain == "" {
				plain = text // t.Fatalf and friends
			}
		}
	}
	// A wait that ran out: the error is the deadline (or the last poll it cut short).
	if strings.Contains(errText, "context deadline exceeded") {
		errText = "timed out"
	}
	msg := plain
	switch {
	case messages != "" && errText != "":
		msg = messages + " (" + errText + ")"
	case messages != "":
		msg = messages
	case errText != "":
		msg = errText
	}
	if msg == "" {
		msg = "failed (no message)"
	}
	return msg, observed
}

func lastLine(lines []string) string {
	for i := len(lines) - 1; i >= 0; i-- {
		if m := logLine.FindStringSubmatch(lines[i]); m != nil {
			return strings.TrimSpace(m[3])
		}
	}
	return ""
}

func cell(s string) string { return clip(strings.ReplaceAll(s, "|", "\\|"), 400) }

func clip(s string, n int) string {
	if len(s) > n {
		return s[:n] + " ..."
	}
	return s
}

func code(s string) string {
	return "`" + strings.ReplaceAll(s, "`", "'") + "`"
}
