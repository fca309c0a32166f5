// Package subnetenv reads and writes subnet.env, the file through which the
// node agent tells the CNI plugin which subnet, MTU and masquerade setting the
// node has. The format is flannel's (FLANNEL_NETWORK, FLANNEL_SUBNET, ...), so
// a host running flanneld can use loom-cni and a host running loom can use
// flannel's CNI plugin.
package subnetenv

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// DefaultPath is where flanneld writes the file unless -subnet-file says otherwise.
const DefaultPath = "/run/flannel/subnet.env"

// Env is the content of subnet.env. Subnet and IPv6Subnet hold the gateway
// address with the node's subnet prefix length (10.244.1.1/24), as flannel writes it.
type Env struct {
	Network     netip.Prefix // FLANNEL_NETWORK
	Subnet      netip.Prefix // FLANNEL_SUBNET
	IPv6Network netip.Prefix // FLANNEL_IPV6_NETWORK
	IPv6Subnet  netip.Prefix // FLANNEL_IPV6_SUBNET
	MTU         int          // FLANNEL_MTU
	IPMasq      bool         // FLANNEL_IPMASQ
}

// ErrNotExist is returned (wrapped) by Read when the file is absent: the agent
// has not run yet on this node.
var ErrNotExist = errors.New("subnet.env does not exist")

// Marshal renders e in flannel's key order.
func (e Env) Marshal() []byte {
	var b bytes.Buffer
	if e.Network.IsValid() {
		fmt.Fprintf(&b, "FLANNEL_NETWORK=%s\n", e.Network)
	}
	if e.Subnet.IsValid() {
		fmt.Fprintf(&b, "FLANNEL_SUBNET=%s\n", e.Subnet)
	}
	if e.IPv6Network.IsValid() {
		fmt.Fprintf(&b, "FLANNEL_IPV6_NETWORK=%s\n", e.IPv6Network)
	}
	if e.IPv6Subnet.IsValid() {
		fmt.Fprintf(&b, "FLANNEL_IPV6_SUBNET=%s\n", e.IPv6Subnet)
	}
	fmt.Fprintf(&b, "FLANNEL_MTU=%d\n", e.MTU)
	fmt.Fprintf(&b, "FLANNEL_IPMASQ=%t\n", e.IPMasq)
	return b.Bytes()
}

// Parse reads the KEY=VALUE lines of a subnet.env. Unknown keys, blank lines and
// comments are ignored (other tools append to this file); a known key with a
// bad value is an error naming the key and the value.
func Parse(data []byte) (Env, error) {
	var e Env
	mtuSeen := false
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			return Env{}, fmt.Errorf("line %d %q: want KEY=VALUE", n, line)
		}
		key = strings.TrimSpace(strings.TrimPrefix(key, "export "))
		val = strings.Trim(strings.TrimSpace(val), `"'`)
		var err error
		switch key {
		case "FLANNEL_NETWORK":
			e.Network, err = parseNetwork(key, val)
		case "FLANNEL_SUBNET":
			e.Subnet, err = parsePrefix(key, val)
		case "FLANNEL_IPV6_NETWORK":
			e.IPv6Network, err = parseNetwork(key, val)
		case "FLANNEL_IPV6_SUBNET":
			e.IPv6Subnet, err = parsePrefix(key, val)
		case "FLANNEL_MTU":
			e.MTU, err = strconv.Atoi(val)
			if err != nil || e.MTU < 68 || e.MTU > 65535 {
				err = fmt.Errorf("%s=%q is not an MTU between 68 and 65535", key, val)
			}
			mtuSeen = true
		case "FLANNEL_IPMASQ":
			e.IPMasq, err = strconv.ParseBool(val)
			if err != nil {
				err = fmt.Errorf("%s=%q is not true or false", key, val)
			}
		}
		if err != nil {
			return Env{}, err
		}
	}
	if err := sc.Err(); err != nil {
		return Env{}, err
	}
	if !e.Subnet.IsValid() && !e.IPv6Subnet.IsValid() {
		return Env{}, errors.New("neither FLANNEL_SUBNET nor FLANNEL_IPV6_SUBNET is set")
	}
	if e.Subnet.IsValid() && !e.Subnet.Addr().Is4() {
		return Env{}, fmt.Errorf("FLANNEL_SUBNET=%s is not IPv4 (IPv6 goes in FLANNEL_IPV6_SUBNET)", e.Subnet)
	}
	if e.IPv6Subnet.IsValid() && !e.IPv6Subnet.Addr().Is6() {
		return Env{}, fmt.Errorf("FLANNEL_IPV6_SUBNET=%s is not IPv6", e.IPv6Subnet)
	}
	if !mtuSeen {
		return Env{}, errors.New("FLANNEL_MTU is not set")
	}
	return e, nil
}

func parsePrefix(key, val string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(val)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%s=%q is not an address/prefix: %w", key, val, err)
	}
	return p, nil
}

func parseNetwork(key, val string) (netip.Prefix, error) {
	p, err := parsePrefix(key, val)
	if err != nil {
		return p, err
	}
	return p.Masked(), nil
}

// Read parses the file at path.
func Read(path string) (Env, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return Env{}, fmt.Errorf("read %s: %w", path, ErrNotExist)
	}
	if err != nil {
		return Env{}, fmt.Errorf("read %s: %w", path, err)
	}
	e, err := Parse(data)
	if err != nil {
		return Env{}, fmt.Errorf("parse %s: %w", path, err)
	}
	return e, nil
}

// Write replaces the file at path atomically (temp file in the same
// directory, fsync, rename), so a CNI ADD running at the same moment sees
// either the old or the new file, never half of one.
func Write(path string, e Env) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	f, err := os.CreateTemp(dir, ".subnet.env-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if _, err := f.Write(e.Marshal()); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
