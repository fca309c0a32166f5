package doctor

// Expressions of nftables rules (as `nft -j` renders them), evaluated for a
// test packet: the left side to a value, the right side (a constant, prefix,
// range, list, anonymous or named set) compared with it.

import (
	"encoding/json"
	"net/netip"
	"strings"
)

// value is what a left-hand expression evaluates to for a packet.
type value struct {
	addr  netip.Addr
	str   string
	num   uint64
	isNum bool
}

func evalLeft(raw json.RawMessage, p Packet) (value, bool) {
	var e map[string]json.RawMessage
	if json.Unmarshal(raw, &e) != nil {
		return value{}, false
	}
	for kind, arg := range e {
		switch kind {
		case "payload":
			var pl struct{ Protocol, Field string }
			if json.Unmarshal(arg, &pl) != nil || pl.Protocol != "ip" {
				return value{}, false
			}
			switch pl.Field {
			case "saddr":
				return value{addr: p.Src}, true
			case "daddr":
				return value{addr: p.Dst}, true
			}
		case "meta":
			var m struct{ Key string }
			if json.Unmarshal(arg, &m) != nil {
				return value{}, false
			}
			switch m.Key {
			case "iifname":
				return value{str: p.IIf}, true
			case "oifname":
				return value{str: p.OIf}, true
			case "mark":
				return value{num: uint64(p.Mark), isNum: true}, true
			case "nfproto":
				return value{str: "ipv4"}, true
			case "l4proto":
				return value{str: "tcp", num: 6}, true
			}
		case "ct":
			var ct struct{ Key string }
			if json.Unmarshal(arg, &ct) != nil || ct.Key != "state" {
				return value{}, false
			}
			return value{str: "new"}, true
		case "fib":
			var fib struct {
				Result string
				Flags  []string
			}
			if json.Unmarshal(arg, &fib) != nil || fib.Result != "type" || len(fib.Flags) != 1 {
				return value{}, false
			}
			local := p.DstLocal
			if fib.Flags[0] == "saddr" {
				local = p.SrcLocal
			}
			if local {
				return value{str: "local"}, true
			}
			return value{str: "unicast"}, true
		case "&":
			var ops []json.RawMessage
			if json.Unmarshal(arg, &ops) != nil || len(ops) != 2 {
				return value{}, false
			}
			v, ok := evalLeft(ops[0], p)
			var mask uint64
			if !ok || !v.isNum || json.Unmarshal(ops[1], &mask) != nil {
				return value{}, false
			}
			return value{num: v.num & mask, isNum: true}, true
		}
	}
	return value{}, false
}

func (rs *NFTRuleset) evalMatch(c *NFTChain, raw json.RawMessage, p Packet) tri {
	var m struct {
		Op    string
		Left  json.RawMessage
		Right json.RawMessage
	}
	if json.Unmarshal(raw, &m) != nil {
		return unknown
	}
	v, ok := evalLeft(m.Left, p)
	if !ok {
		return unknown
	}
	var t tri
	var ref string
	if json.Unmarshal(m.Right, &ref) == nil && strings.HasPrefix(ref, "@") {
		elems, ok := rs.setElems(c, m.Right)
		if !ok {
			return unknown
		}
		t = anyElem(v, elems)
	} else {
		t = elemMatch(v, m.Right)
	}
	switch m.Op {
	case "==", "in", "":
		return t
	case "!=":
		return t.not()
	}
	return unknown
}

// setElems returns the elements of a named set/map ("@name") or of an
// anonymous {"set": [...]}.
func (rs *NFTRuleset) setElems(c *NFTChain, raw json.RawMessage) ([]json.RawMessage, bool) {
	var ref string
	if json.Unmarshal(raw, &ref) == nil && strings.HasPrefix(ref, "@") {
		s, ok := rs.sets[c.Family+" "+c.Table+" "+ref[1:]]
		return s.elems, ok
	}
	var anon struct{ Set []json.RawMessage }
	if json.Unmarshal(raw, &anon) == nil && anon.Set != nil {
		return anon.Set, true
	}
	return nil, false
}

func anyElem(v value, elems []json.RawMessage) tri {
	t := no
	for _, el := range elems {
		switch elemMatch(v, el) {
		case yes:
			return yes
		case unknown:
			t = unknown
		}
	}
	return t
}

// elemMatch compares a value with one right-hand side: a string, number,
// prefix, range, list or anonymous set, or a set element wrapped in
// {"elem": {"val": ...}}.
func elemMatch(v value, raw json.RawMessage) tri {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		if v.addr.IsValid() {
			pre, ok := parsePrefixOrAddr(s)
			if !ok {
				return unknown
			}
			return triOf(pre.Contains(v.addr))
		}
		if v.isNum {
			return unknown
		}
		return triOf(ifaceMatch(s, v.str) || strings.EqualFold(s, v.str))
	}
	var n uint64
	if json.Unmarshal(raw, &n) == nil {
		return triOf(v.isNum && v.num == n)
	}
	var list []json.RawMessage
	if json.Unmarshal(raw, &list) == nil {
		return anyElem(v, list)
	}
	var obj map[string]json.RawMessage
	if json.Unmarshal(raw, &obj) != nil {
		return unknown
	}
	if pre, ok := obj["prefix"]; ok {
		var p struct {
			Addr string
			Len  int
		}
		if json.Unmarshal(pre, &p) != nil || !v.addr.IsValid() {
			return unknown
		}
		a, err := netip.ParseAddr(p.Addr)
		if err != nil {
			return unknown
		}
		return triOf(netip.PrefixFrom(a, p.Len).Masked().Contains(v.addr))
	}
	if rng, ok := obj["range"]; ok {
		var bounds []string
		if json.Unmarshal(rng, &bounds) != nil || len(bounds) != 2 || !v.addr.IsValid() {
			return unknown
		}
		lo, err1 := netip.ParseAddr(bounds[0])
		hi, err2 := netip.ParseAddr(bounds[1])
		if err1 != nil || err2 != nil {
			return unknown
		}
		return triOf(lo.Compare(v.addr) <= 0 && v.addr.Compare(hi) <= 0)
	}
	if set, ok := obj["set"]; ok {
		var elems []json.RawMessage
		if json.Unmarshal(set, &elems) != nil {
			return unknown
		}
		return anyElem(v, elems)
	}
	if el, ok := obj["elem"]; ok {
		var e struct{ Val json.RawMessage }
		if json.Unmarshal(el, &e) != nil {
			return unknown
		}
		return elemMatch(v, e.Val)
	}
	return unknown
}
