package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/loomnet/loom/internal/ipam"
	"github.com/loomnet/loom/internal/subnetenv"
)

// PluginType is the plugin's "type" in a network configuration, and so the
// name of its binary in CNI_PATH.
const PluginType = "loom-cni"

// Defaults of the optional configuration fields.
const (
	DefaultSubnetFile = subnetenv.DefaultPath // flanneld's and loom agent's default
	DefaultDataDir    = ipam.DefaultDataDir   // host-local's default
	DefaultBridge     = "cni0"                // flannel's bridge name
)

// NetConf is loom-cni's entry in a network configuration list, as JSON. The
// zero value of every optional field means its default, so a lab or an
// installer builds one with only the fields it cares about and marshals it
// (or hands it to ConfList).
type NetConf struct {
	CNIVersion string `json:"cniVersion,omitempty"`
	Name       string `json:"name,omitempty"`
	Type       string `json:"type"`

	// SubnetFile is the agent's subnet.env; default DefaultSubnetFile.
	SubnetFile string `json:"subnetFile,omitempty"`
	// DataDir is the IPAM store root; allocations live in
	// DataDir/<network name>/. Default DefaultDataDir.
	DataDir string `json:"dataDir,omitempty"`
	// Bridge is the node-side bridge; default DefaultBridge.
	Bridge string `json:"bridge,omitempty"`
	// HairpinMode lets a pod reach itself through a Service; default true.
	HairpinMode *bool `json:"hairpinMode,omitempty"`
	// MTU overrides FLANNEL_MTU for the pod and bridge links; 0 means
	// FLANNEL_MTU.
	MTU int `json:"mtu,omitempty"`
	// IsDefaultGateway routes everything via the bridge; false routes only
	// FLANNEL_NETWORK (and FLANNEL_IPV6_NETWORK). Default true.
	IsDefaultGateway *bool `json:"isDefaultGateway,omitempty"`
}

// Config is a network configuration read from stdin, with defaults applied
// and every field checked.
type Config struct {
	CNIVersion       string
	Name             string
	SubnetFile       string
	DataDir          string
	Bridge           string
	HairpinMode      bool
	MTU              int // 0: use FLANNEL_MTU
	IsDefaultGateway bool

	// PrevResult is what earlier plugins of the list returned, or nil.
	// loom-cni is the first plugin, so only CHECK reads it (it is the
	// runtime's cached copy of our own ADD result).
	PrevResult types.Result
	// ValidAttachments is the GC list. It is nil when the runtime sent none,
	// and then GC frees nothing: no list says nothing about what is stale.
	// An empty, non-nil list means that no attachment is valid.
	ValidAttachments []ipam.Attachment
}

// NetConf returns the configuration as it would appear in a network
// configuration list (defaults written out).
func (c *Config) NetConf() NetConf {
	return NetConf{
		CNIVersion:       c.CNIVersion,
		Name:             c.Name,
		Type:             PluginType,
		SubnetFile:       c.SubnetFile,
		DataDir:          c.DataDir,
		Bridge:           c.Bridge,
		HairpinMode:      &c.HairpinMode,
		MTU:              c.MTU,
		IsDefaultGateway: &c.IsDefaultGateway,
	}
}

// wireConf is the stdin document. Our own fields whose type a user is likely
// to get wrong are raw, so the error can quote the value.
type wireConf struct {
	types.PluginConf
	SubnetFile       string          `json:"subnetFile"`
	DataDir          string          `json:"dataDir"`
	Bridge           string          `json:"bridge"`
	HairpinMode      *bool           `json:"hairpinMode"`
	MTU              json.RawMessage `json:"mtu"`
	IsDefaultGateway *bool           `json:"isDefaultGateway"`
	// Raw to tell "absent" from "null"; shadows PluginConf's field. libcni
	// also sends the spec's first spelling, cni.dev/attachments.
	ValidAttachments    json.RawMessage `json:"cni.dev/valid-attachments"`
	OldValidAttachments json.RawMessage `json:"cni.dev/attachments"`
}

// ParseConf reads the network configuration a runtime passes on stdin.
// Unknown fields are ignored (runtimes add runtimeConfig, args and more).
// Errors are *types.Error: code 6 when stdin is not JSON, 7 when a field has
// a bad value, naming the field and what it accepts.
func ParseConf(stdin []byte) (*Config, error) {
	var w wireConf
	if err := json.Unmarshal(stdin, &w); err != nil {
		if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok && te.Field != "" {
			return nil, invalidConf(te.Field, fmt.Sprintf("is a JSON %s, want %s", te.Value, te.Type))
		}
		return nil, types.NewError(types.ErrDecodingFailure, "decode network configuration: "+err.Error(), "stdin must be the JSON network configuration")
	}
	c := &Config{
		CNIVersion:       w.CNIVersion,
		Name:             w.Name,
		SubnetFile:       orDefault(w.SubnetFile, DefaultSubnetFile),
		DataDir:          orDefault(w.DataDir, DefaultDataDir),
		Bridge:           orDefault(w.Bridge, DefaultBridge),
		HairpinMode:      w.HairpinMode == nil || *w.HairpinMode,
		IsDefaultGateway: w.IsDefaultGateway == nil || *w.IsDefaultGateway,
	}
	if c.Name == "" {
		return nil, invalidConf("name", "is missing")
	}
	if _, err := ipam.New(ipam.Config{DataDir: c.DataDir, Network: c.Name}); err != nil {
		return nil, invalidConf("name", err.Error())
	}
	for _, f := range []struct{ field, path string }{{"subnetFile", c.SubnetFile}, {"dataDir", c.DataDir}} {
		if !filepath.IsAbs(f.path) {
			return nil, invalidConf(f.field, fmt.Sprintf("%q is not an absolute path", f.path))
		}
	}
	if err := validIfName(c.Bridge); err != nil {
		return nil, invalidConf("bridge", err.Error())
	}
	mtu, err := parseMTU(w.MTU)
	if err != nil {
		return nil, invalidConf("mtu", err.Error())
	}
	c.MTU = mtu

	raw := w.ValidAttachments
	if raw == nil {
		raw = w.OldValidAttachments
	}
	if raw != nil {
		var list []types.GCAttachment
		if err := json.Unmarshal(raw, &list); err != nil {
			return nil, invalidConf("cni.dev/valid-attachments", "is not a list of {containerID, ifname}: "+err.Error())
		}
		c.ValidAttachments = make([]ipam.Attachment, len(list))
		for i, a := range list {
			c.ValidAttachments[i] = ipam.Attachment{ContainerID: a.ContainerID, IfName: a.IfName}
		}
	}

	if w.RawPrevResult != nil {
		if err := version.ParsePrevResult(&w.PluginConf); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, "decode prevResult: "+err.Error(), "")
		}
		c.PrevResult = w.PrevResult
	}
	return c, nil
}

// parseMTU accepts an absent or null mtu (use FLANNEL_MTU) or an integer in
// the range the kernel accepts for an IPv4-capable link.
func parseMTU(raw json.RawMessage) (int, error) {
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return 0, nil
	}
	var n json.Number
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&n); err != nil {
		return 0, fmt.Errorf("%s is not a number: set an integer between 68 and 65535, or leave mtu out to use FLANNEL_MTU", raw)
	}
	v, err := n.Int64()
	if err != nil || v < 68 || v > 65535 {
		return 0, fmt.Errorf("%s is not an integer between 68 and 65535 (leave mtu out to use FLANNEL_MTU)", raw)
	}
	return int(v), nil
}

// validIfName applies the kernel's rules for a link name.
func validIfName(name string) error {
	switch {
	case name == "":
		return errors.New("is empty")
	case len(name) > 15:
		return fmt.Errorf("%q is longer than 15 bytes", name)
	case name == "." || name == "..":
		return fmt.Errorf("%q is not a valid interface name", name)
	case strings.ContainsFunc(name, func(r rune) bool { return r == '/' || r == ':' || r <= ' ' || r == 0x7f }):
		return fmt.Errorf("%q contains '/', ':', a space or a control character", name)
	}
	return nil
}

func invalidConf(field, problem string) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig,
		fmt.Sprintf("invalid network configuration: %s %s", field, problem),
		"fix the field in the loom-cni entry of the CNI network configuration (e.g. /etc/cni/net.d/10-loom.conflist)")
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// ConfList renders a network configuration list (a .conflist file) with
// loom-cni first and the chained plugins after it, e.g. portmap's
// map[string]any{"type": "portmap", "capabilities": {"portMappings": true}}.
func ConfList(cniVersion, name string, loom NetConf, chained ...any) ([]byte, error) {
	if loom.Type == "" {
		loom.Type = PluginType
	}
	// The list carries name and version; plugin entries inherit them.
	loom.CNIVersion, loom.Name = "", ""
	list := struct {
		CNIVersion string `json:"cniVersion"`
		Name       string `json:"name"`
		Plugins    []any  `json:"plugins"`
	}{cniVersion, name, append([]any{loom}, chained...)}
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("render network configuration list %s: %w", name, err)
	}
	return b, nil
}
