package vxlan

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
)

// macDomain separates loom's VTEP MAC derivation from any other use of
// SHA-256 over a node name.
const macDomain = "loom vxlan vtep mac"

// VtepMAC derives the VTEP MAC of device dev (DeviceName) on node:
//
//	h      = SHA-256("loom vxlan vtep mac" || 0x00 || node || 0x00 || dev)
//	MAC    = h[0:6], with bit 0x02 of the first octet set (locally
//	         administered) and bit 0x01 cleared (unicast)
//
// The same node name and device give the same MAC on every boot, with no
// state, so peers' neighbour and FDB entries stay right across restarts and
// reboots. dev carries the VNI and the address family, so flannel.1 and
// flannel-v6.1 get different MACs, as flannel's two devices do. 46 bits of
// hash make a collision between two nodes of one cluster negligible (about
// n²/2^47 for n nodes: under one in five million for 5,000 nodes), and plan
// reports one if it happens.
func VtepMAC(node, dev string) net.HardwareAddr {
	sum := sha256.Sum256([]byte(macDomain + "\x00" + node + "\x00" + dev))
	mac := make(net.HardwareAddr, 6)
	copy(mac, sum[:6])
	mac[0] = mac[0]&^0x01 | 0x02
	return mac
}

// macFile is where the VTEP MAC of dev is persisted in a state directory.
func macFile(stateDir, dev string) string { return filepath.Join(stateDir, dev+".mac") }

// vtepMAC returns the MAC to give dev: the one persisted in stateDir when
// there is a valid one, else the derived one; and it persists what it
// returns. A state directory lets an operator pin a MAC (or keep one across
// a node rename); without one, derivation alone keeps the MAC stable.
// Failing to persist is logged, not fatal: the derived MAC is stable anyway.
func vtepMAC(stateDir, node, dev string, log *slog.Logger) net.HardwareAddr {
	mac := VtepMAC(node, dev)
	if stateDir == "" {
		return mac
	}
	path := macFile(stateDir, dev)
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		log.Warn("cannot read the persisted VTEP MAC; using the derived one", "file", path, "err", err, "mac", mac)
	default:
		if m, err := parseUnicastMAC(strings.TrimSpace(string(data))); err != nil {
			log.Warn("the persisted VTEP MAC is invalid; using the derived one and overwriting the file",
				"file", path, "err", err, "mac", mac)
		} else {
			if !bytes.Equal(m, mac) {
				log.Info("using the persisted VTEP MAC, not the derived one", "file", path, "mac", m, "derived", mac)
			}
			return m
		}
	}
	if err := writeAtomic(path, []byte(mac.String()+"\n")); err != nil {
		log.Warn("cannot persist the VTEP MAC; the derived one stays stable anyway", "err", err)
	}
	return mac
}

// parseUnicastMAC parses a MAC a VTEP can use: six bytes, unicast, not zero.
func parseUnicastMAC(s string) (net.HardwareAddr, error) {
	m, err := net.ParseMAC(s)
	if err != nil {
		return nil, err
	}
	if len(m) != 6 {
		return nil, fmt.Errorf("%s is not a 6-byte Ethernet address", s)
	}
	if m[0]&1 != 0 {
		return nil, fmt.Errorf("%s is a multicast address", s)
	}
	if bytes.Equal(m, make(net.HardwareAddr, 6)) {
		return nil, fmt.Errorf("%s is the zero address", s)
	}
	return m, nil
}

// writeAtomic replaces path with data (mode 0644) so that a reader sees the
// old or the new content, never a mix.
func writeAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(f.Name()) // after a successful rename there is nothing to remove
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
