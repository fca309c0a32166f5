package doctor

import (
	"bufio"
	"fmt"
	"strconv"
	"strings"
)

// IPTables is an iptables-save dump: tables of chains of rules.
type IPTables struct {
	Tables map[string]*IPTTable
}

// IPTTable is one table (*nat, *filter, ...).
type IPTTable struct {
	Name   string
	Chains map[string]*IPTChain
}

// IPTChain is one chain; Policy is "-" for a user chain.
type IPTChain struct {
	Name   string
	Policy string
	Rules  []IPTRule
}

// IPTRule is one -A line.
type IPTRule struct {
	Text    string // the line as iptables-save wrote it
	Matches []iptMatch
	Target  string // -j or -g target, "" for none
	Goto    bool   // -g
}

// iptMatch is one condition of a rule.
type iptMatch struct {
	kind  string // "s", "d", "i", "o", "p", "mark", "ctstate", "dst-type", "src-type", "unknown"
	value string
	neg   bool
}

// ParseIPTablesSave reads iptables-save output.
func ParseIPTablesSave(data string) (*IPTables, error) {
	out := &IPTables{Tables: map[string]*IPTTable{}}
	var cur *IPTTable
	sc := bufio.NewScanner(strings.NewReader(data))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || line == "COMMIT":
		case strings.HasPrefix(line, "*"):
			cur = &IPTTable{Name: line[1:], Chains: map[string]*IPTChain{}}
			out.Tables[cur.Name] = cur
		case cur == nil:
			return nil, fmt.Errorf("line %d %q: outside a table", n, line)
		case strings.HasPrefix(line, ":"):
			f := strings.Fields(line[1:])
			if len(f) < 2 {
				return nil, fmt.Errorf("line %d %q: bad chain line", n, line)
			}
			cur.Chains[f[0]] = &IPTChain{Name: f[0], Policy: f[1]}
		case strings.HasPrefix(line, "-A "):
			args, err := splitArgs(line)
			if err != nil {
				return nil, fmt.Errorf("line %d: %w", n, err)
			}
			ch := cur.Chains[args[1]]
			if ch == nil {
				ch = &IPTChain{Name: args[1], Policy: "-"}
				cur.Chains[args[1]] = ch
			}
			ch.Rules = append(ch.Rules, parseIPTRule(line, args[2:]))
		}
	}
	return out, sc.Err()
}

// splitArgs splits a rule line into words, honouring double quotes (comments).
func splitArgs(line string) ([]string, error) {
	var out []string
	var b strings.Builder
	inQuote, have := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == '\\' && inQuote && i+1 < len(line):
			i++
			b.WriteByte(line[i])
		case c == '"':
			inQuote, have = !inQuote, true
		case c == ' ' && !inQuote:
			if have {
				out = append(out, b.String())
				b.Reset()
				have = false
			}
		default:
			b.WriteByte(c)
			have = true
		}
	}
	if inQuote {
		return nil, fmt.Errorf("unterminated quote in %q", line)
	}
	if have {
		out = append(out, b.String())
	}
	if len(out) < 2 {
		return nil, fmt.Errorf("rule %q names no chain", line)
	}
	return out, nil
}

func parseIPTRule(text string, args []string) IPTRule {
	r := IPTRule{Text: text}
	neg := false
	module := ""
	add := func(kind, value string) {
		r.Matches = append(r.Matches, iptMatch{kind: kind, value: value, neg: neg})
		neg = false
	}
	for i := 0; i < len(args); i++ {
		a := args[i]
		val := func() string {
			if i+1 < len(args) {
				i++
				return args[i]
			}
			return ""
		}
		switch a {
		case "!":
			neg = true
		case "-s", "--source":
			add("s", val())
		case "-d", "--destination":
			add("d", val())
		case "-i", "--in-interface":
			add("i", val())
		case "-o", "--out-interface":
			add("o", val())
		case "-p", "--protocol":
			add("p", val())
		case "-m", "--match":
			module = val()
		case "-j", "--jump":
			r.Target = val()
			return r // the rest are the target's options (--random-fully, --to-source...)
		case "-g", "--goto":
			r.Target, r.Goto = val(), true
			return r
		case "--comment":
			val()
		case "--mark":
			add("mark", val())
		case "--ctstate", "--state":
			add("ctstate", val())
		case "--dst-type":
			add("dst-type", val())
		case "--src-type":
			add("src-type", val())
		default:
			if strings.HasPrefix(a, "-") {
				// An option of a match doctor does not model (ports, sets,
				// physdev...): the rule's effect is unknown for the packet.
				v := a
				if i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") && args[i+1] != "!" {
					v += " " + val()
				}
				add("unknown", module+" "+v)
			}
		}
	}
	return r
}

func (m iptMatch) eval(p Packet) tri {
	var t tri
	switch m.kind {
	case "s", "d":
		pre, ok := parsePrefixOrAddr(m.value)
		if !ok {
			return unknown
		}
		a := p.Src
		if m.kind == "d" {
			a = p.Dst
		}
		t = triOf(pre.Contains(a))
	case "i":
		t = triOf(p.IIf != "" && ifaceMatch(m.value, p.IIf))
	case "o":
		t = triOf(p.OIf != "" && ifaceMatch(m.value, p.OIf))
	case "p":
		v := strings.ToLower(m.value)
		t = triOf(v == "tcp" || v == "6" || v == "all" || v == "0")
	case "mark":
		val, mask, err := parseMark(m.value)
		if err != nil {
			return unknown
		}
		t = triOf(p.Mark&mask == val)
	case "ctstate":
		t = triOf(strings.Contains(","+strings.ToUpper(m.value)+",", ",NEW,"))
	case "dst-type", "src-type":
		local := p.DstLocal
		if m.kind == "src-type" {
			local = p.SrcLocal
		}
		switch strings.ToUpper(m.value) {
		case "LOCAL":
			t = triOf(local)
		case "UNICAST":
			t = yes
		default:
			return unknown
		}
	default:
		return unknown
	}
	if m.neg {
		return t.not()
	}
	return t
}

// parseMark reads 0x4000/0x4000 or 0x4000 (mask all ones).
func parseMark(s string) (val, mask uint32, err error) {
	v, m, hasMask := strings.Cut(s, "/")
	x, err := strconv.ParseUint(v, 0, 32)
	if err != nil {
		return 0, 0, err
	}
	mask = 0xffffffff
	if hasMask {
		y, err := strconv.ParseUint(m, 0, 32)
		if err != nil {
			return 0, 0, err
		}
		mask = uint32(y)
	}
	return uint32(x) & mask, mask, nil
}

// match evaluates all of a rule's conditions.
func (r IPTRule) match(p Packet) tri {
	t := yes
	for _, m := range r.Matches {
		t = and(t, m.eval(p))
	}
	return t
}

// maxDepth bounds chain recursion (a loop is a kernel error anyway).
const maxDepth = 32

// TraceIPT runs p through chain of table and returns what happened.
func (ipt *IPTables) TraceIPT(table, chain string, p Packet) Trace {
	var tr Trace
	t := ipt.Tables[table]
	if t == nil || t.Chains[chain] == nil {
		return tr
	}
	v, rule := t.run(chain, p, &tr, 0)
	if v == Continue || v == Return {
		pol := t.Chains[chain].Policy
		if pol == "DROP" {
			return Trace{Verdict: Drop, Rule: fmt.Sprintf(":%s DROP (policy of table %s)", chain, table), Unsure: tr.Unsure}
		}
		v, rule = Continue, fmt.Sprintf(":%s %s (policy)", chain, pol)
	}
	tr.Verdict, tr.Rule = v, rule
	return tr
}

func (t *IPTTable) run(chain string, p Packet, tr *Trace, depth int) (Verdict, string) {
	ch := t.Chains[chain]
	if ch == nil || depth > maxDepth {
		return Continue, ""
	}
	for _, r := range ch.Rules {
		switch r.match(p) {
		case no:
			continue
		case unknown:
			tr.unsure(r.Text)
			continue
		}
		switch r.Target {
		case "ACCEPT":
			return Accept, r.Text
		case "DROP", "REJECT":
			return Drop, r.Text
		case "MASQUERADE", "SNAT":
			return Masquerade, r.Text
		case "DNAT", "REDIRECT":
			return DNAT, r.Text
		case "RETURN":
			return Return, r.Text
		case "":
			continue
		}
		if t.Chains[r.Target] == nil {
			continue // a non-terminating target: MARK, LOG, CONNMARK, CT...
		}
		v, rule := t.run(r.Target, p, tr, depth+1)
		if v != Continue && v != Return {
			return v, rule
		}
		if r.Goto {
			return Return, rule
		}
	}
	return Continue, ""
}
