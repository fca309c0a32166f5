package cni

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"unicode/utf8"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// printResult prints ADD's result in the caller's version. Results of spec
// 1.0.0 and 1.1.0, the versions of types/100, are written by appendResult
// instead of encoding/json: the reflection behind json.Marshal (and the
// MarshalJSON methods of the CNI types, which marshal again) builds its
// encoders on first use, and in a process that lives for one ADD that
// first use cost 0.2 ms of every pod's set-up (appendResult: 0.01 ms).
// Anything appendResult does not write (0.4.0 callers, DNS, fields loom
// never sets) goes through types.PrintResult.
func printResult(res *current.Result, version string) error {
	if (version != "1.0.0" && version != "1.1.0") || !plainResult(res) {
		return types.PrintResult(res, version)
	}
	if _, err := os.Stdout.Write(appendResult(nil, res, version)); err != nil {
		return fmt.Errorf("print the result: %w", err)
	}
	return nil
}

// plainResult reports whether res holds only what appendResult writes.
func plainResult(res *current.Result) bool {
	if len(res.DNS.Nameservers)+len(res.DNS.Search)+len(res.DNS.Options) != 0 || res.DNS.Domain != "" {
		return false
	}
	for _, i := range res.Interfaces {
		if i == nil || i.SocketPath != "" || i.PciID != "" {
			return false
		}
	}
	for _, ip := range res.IPs {
		if ip == nil || !plainIP(ip.Gateway) {
			return false
		}
	}
	for _, r := range res.Routes {
		if r == nil || !plainIP(r.GW) || r.MTU != 0 || r.AdvMSS != 0 || r.Priority != 0 || r.Table != nil || r.Scope != nil {
			return false
		}
	}
	return true
}

// plainIP reports whether ip is absent or an address net.IP's text form
// covers (encoding/json fails on any other length).
func plainIP(ip net.IP) bool {
	return len(ip) == 0 || len(ip) == net.IPv4len || len(ip) == net.IPv6len
}

// appendResult appends res as JSON, with the fields and omissions that
// encoding/json gives the types/100 structs (TestResultJSON compares the
// two).
func appendResult(b []byte, res *current.Result, version string) []byte {
	b = append(b, `{"cniVersion":`...)
	b = appendString(b, version)
	if len(res.Interfaces) > 0 {
		b = append(b, `,"interfaces":[`...)
		for n, i := range res.Interfaces {
			if n > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"name":`...)
			b = appendString(b, i.Name)
			if i.Mac != "" {
				b = append(b, `,"mac":`...)
				b = appendString(b, i.Mac)
			}
			if i.Mtu != 0 {
				b = append(b, `,"mtu":`...)
				b = strconv.AppendInt(b, int64(i.Mtu), 10)
			}
			if i.Sandbox != "" {
				b = append(b, `,"sandbox":`...)
				b = appendString(b, i.Sandbox)
			}
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	if len(res.IPs) > 0 {
		b = append(b, `,"ips":[`...)
		for n, ip := range res.IPs {
			if n > 0 {
				b = append(b, ',')
			}
			b = append(b, '{')
			if ip.Interface != nil {
				b = append(b, `"interface":`...)
				b = strconv.AppendInt(b, int64(*ip.Interface), 10)
				b = append(b, ',')
			}
			b = append(b, `"address":`...)
			b = appendString(b, ip.Address.String())
			if len(ip.Gateway) != 0 {
				b = append(b, `,"gateway":`...)
				b = appendString(b, ip.Gateway.String())
			}
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	if len(res.Routes) > 0 {
		b = append(b, `,"routes":[`...)
		for n, r := range res.Routes {
			if n > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"dst":`...)
			b = appendString(b, r.Dst.String())
			if len(r.GW) != 0 {
				b = append(b, `,"gw":`...)
				b = appendString(b, r.GW.String())
			}
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	return append(b, '}')
}

// appendString appends s as a JSON string, escaped as encoding/json
// escapes it: quotes, backslashes, control characters, the HTML-sensitive
// <, > and &, U+2028 and U+2029, and invalid UTF-8 as U+FFFD.
func appendString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c == '\n':
				b = append(b, '\\', 'n')
			case c == '\r':
				b = append(b, '\\', 'r')
			case c == '\t':
				b = append(b, '\\', 't')
			case c < 0x20 || c == '<' || c == '>' || c == '&':
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
		default:
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}
