// Package kubecp prepares and runs a real Kubernetes control plane (etcd,
// kube-apiserver, kube-controller-manager) for loom's Kubernetes mode: the
// tests of the agent's Kubernetes subnet manager and `loom lab up
// --datastore kube` run against the real thing, at the release pinned in
// tools/kube (KubeVersion), never against a fake API.
//
// Preparing and running are separate because the two users run the
// processes differently:
//
//   - Tests call Start: an embedded etcd (internal/storeserver) and the two
//     processes as children of the test, on free loopback ports, killed by
//     Stop or, if the test crashes, by the kernel (Pdeathsig).
//   - The lab calls Prepare, starts Plan.APIServer and Plan.ControllerManager
//     itself as daemons in its router namespace, and calls Plan.Wait with a
//     Config.DialContext that opens its connections inside that namespace.
//
// Prepare writes everything the processes need under Config.Dir:
//
//	pki/ca.pem                          the cluster CA (its key is never written)
//	pki/apiserver.pem, -key.pem         serving certificate: Address, 127.0.0.1, first service IP
//	pki/controller-manager.pem, -key.pem serving certificate of the controller manager's health port
//	pki/sa.pub, pki/sa-key.pem          service account token signing key pair
//	pki/tokens.csv                      --token-auth-file: admin, controller manager, Config.Users
//	admin.kubeconfig                    group system:masters
//	controller-manager.kubeconfig       system:kube-controller-manager, also in system:masters
//	users/<name>.kubeconfig             one per Config.Users entry
//	plan.json                           the Plan, for Load
//
// Clients authenticate with static bearer tokens: they need no client
// certificates, a user can be in any group (e.g. a ServiceAccount's
// username in system:serviceaccounts, so RBAC bindings to that
// ServiceAccount apply to it), and the kubeconfig files are self-contained.
package kubecp

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/csv"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/loomnet/loom/internal/lab/certs"
)

// Defaults of Config.
const (
	DefaultPort                  = 6443  // kube-apiserver's usual secure port
	DefaultControllerManagerPort = 10257 // kube-controller-manager's usual secure port
	DefaultNodeCIDRMaskSize      = 24    // flannel's default subnet size
)

// DefaultServiceCIDR is kubeadm's default service range; its first address,
// 10.96.0.1, is the "kubernetes" Service and is in the serving certificate.
const DefaultServiceCIDR = "10.96.0.0/12"

// loopback is 127.0.0.1, where the controller manager's health port and
// Start's etcd listen.
func loopback() netip.Addr { return netip.AddrFrom4([4]byte{127, 0, 0, 1}) }

// Names of the built-in identities.
const (
	// AdminUser is the identity of Plan.AdminKubeconfig and Plan.Kubectl.
	AdminUser = "loom-admin"
	// ControllerManagerUser is the controller manager's identity. It is
	// also in system:masters: with --use-service-account-credentials=false
	// every controller acts as this one user, and the built-in role of that
	// name only covers bootstrapping per-controller identities.
	ControllerManagerUser = "system:kube-controller-manager"
	// MastersGroup is the group RBAC always allows everything.
	MastersGroup = "system:masters"
)

// serviceAccountIssuer is the issuer of service account tokens, the
// in-cluster name kubeadm uses too.
const serviceAccountIssuer = "https://kubernetes.default.svc.cluster.local"

// User is an identity a test or the lab wants a kubeconfig for.
type User struct {
	// Name is the username the apiserver sees, e.g.
	// "system:serviceaccount:kube-flannel:loom".
	Name string
	// Groups are the user's groups, e.g. "system:serviceaccounts" and
	// "system:serviceaccounts:kube-flannel" for a ServiceAccount's name.
	// "system:authenticated" is added by the apiserver.
	Groups []string
}

// Config describes a control plane.
type Config struct {
	// Dir holds the PKI, the kubeconfigs and, for Start, etcd's data and
	// the processes' logs. Required; created if missing.
	Dir string
	// Address is where the apiserver listens and what it advertises.
	// Default 127.0.0.1; the lab uses its router's underlay address.
	Address netip.Addr
	// Port is the apiserver's secure port. Prepare: default 6443. Start:
	// 0 picks a free port.
	Port int
	// ControllerManagerPort is the controller manager's health port, always
	// on 127.0.0.1 (of the namespace it runs in). Prepare: default 10257.
	// Start: 0 picks a free port.
	ControllerManagerPort int
	// EtcdServers are the etcd client URLs of the apiserver. Required by
	// Prepare (the lab: its loom store, http://127.0.0.1:2379); Start sets
	// them to its embedded etcd.
	EtcdServers []string
	// ServiceCIDR is the Service IP range; default DefaultServiceCIDR.
	ServiceCIDR netip.Prefix
	// ClusterCIDR is the pod network the controller manager carves node
	// podCIDRs out of. The zero Prefix turns allocation off
	// (--allocate-node-cidrs=false): Nodes then never get a podCIDR.
	ClusterCIDR netip.Prefix
	// NodeCIDRMaskSize is the prefix length of each node's podCIDR;
	// default 24.
	NodeCIDRMaskSize int
	// Users get a token and a kubeconfig each (Plan.Kubeconfig).
	Users []User
	// Bins are the binaries; the zero value means FindBins.
	Bins Bins
	// DialContext, when set, opens every connection this package makes to
	// the apiserver and the controller manager, e.g. netns.Dialer{NS:
	// router}.DialContext for a control plane inside a namespace.
	// Load cannot restore it: set it on the loaded Plan's Config.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error) `json:"-"`
	// Verbosity is the processes' klog level (-v); default 0.
	Verbosity int
}

// Command is one process to run.
type Command struct {
	Bin  string
	Args []string
}

// Plan is a prepared control plane: files written, command lines ready.
type Plan struct {
	// Config is the configuration with every default filled in.
	Config Config
	// APIServer and ControllerManager are the two processes to run, in
	// this order: the controller manager exits if the apiserver is not
	// healthy within 10 s of its start (see WaitAPIServer).
	APIServer, ControllerManager Command
	// URL is the apiserver's address, https://Address:Port.
	URL string
	// ControllerManagerURL is the controller manager's health endpoint
	// base, https://127.0.0.1:ControllerManagerPort.
	ControllerManagerURL string
	// CAFile is the cluster CA certificate (PEM): it signed the serving
	// certificates and is the service accounts' root CA.
	CAFile string
	// AdminKubeconfig authenticates as AdminUser (system:masters).
	AdminKubeconfig string
	// AdminToken is AdminUser's bearer token.
	AdminToken string
	// ControllerManagerKubeconfig is the controller manager's kubeconfig.
	ControllerManagerKubeconfig string

	users map[string]userFiles // by User.Name
}

type userFiles struct {
	token, kubeconfig string
}

// Kubeconfig returns the path of the kubeconfig of user, one of
// Config.Users, AdminUser or ControllerManagerUser.
func (p *Plan) Kubeconfig(user string) (string, error) {
	u, ok := p.users[user]
	if !ok {
		return "", fmt.Errorf("no kubeconfig for user %q: add it to kubecp.Config.Users", user)
	}
	return u.kubeconfig, nil
}

// Token returns the bearer token of user, one of Config.Users, AdminUser or
// ControllerManagerUser.
func (p *Plan) Token(user string) (string, error) {
	u, ok := p.users[user]
	if !ok {
		return "", fmt.Errorf("no token for user %q: add it to kubecp.Config.Users", user)
	}
	return u.token, nil
}

func withDefaults(cfg Config) (Config, error) {
	if cfg.Dir == "" {
		return cfg, errors.New("kubernetes control plane: no directory given (Config.Dir)")
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return cfg, fmt.Errorf("kubernetes control plane directory %s: %w", cfg.Dir, err)
	}
	cfg.Dir = dir
	if !cfg.Address.IsValid() {
		cfg.Address = loopback()
	}
	if cfg.Port == 0 {
		cfg.Port = DefaultPort
	}
	if cfg.ControllerManagerPort == 0 {
		cfg.ControllerManagerPort = DefaultControllerManagerPort
	}
	if !cfg.ServiceCIDR.IsValid() {
		cfg.ServiceCIDR = netip.MustParsePrefix(DefaultServiceCIDR)
	}
	cfg.ServiceCIDR = cfg.ServiceCIDR.Masked()
	if cfg.ClusterCIDR.IsValid() {
		cfg.ClusterCIDR = cfg.ClusterCIDR.Masked()
	}
	if cfg.NodeCIDRMaskSize == 0 {
		cfg.NodeCIDRMaskSize = DefaultNodeCIDRMaskSize
	}
	return cfg, nil
}

func validate(cfg Config) error {
	if len(cfg.EtcdServers) == 0 {
		return errors.New("kubernetes control plane: no etcd servers given (Config.EtcdServers)")
	}
	for _, port := range []int{cfg.Port, cfg.ControllerManagerPort} {
		if port < 1 || port > 65535 {
			return fmt.Errorf("kubernetes control plane: port %d out of range 1-65535", port)
		}
	}
	if cfg.ClusterCIDR.IsValid() {
		if cfg.NodeCIDRMaskSize < cfg.ClusterCIDR.Bits() || cfg.NodeCIDRMaskSize > cfg.ClusterCIDR.Addr().BitLen() {
			return fmt.Errorf("kubernetes control plane: node CIDR mask size /%d does not fit in cluster CIDR %s",
				cfg.NodeCIDRMaskSize, cfg.ClusterCIDR)
		}
		if cfg.ClusterCIDR.Overlaps(cfg.ServiceCIDR) {
			return fmt.Errorf("kubernetes control plane: cluster CIDR %s overlaps service CIDR %s", cfg.ClusterCIDR, cfg.ServiceCIDR)
		}
	}
	seen := map[string]bool{AdminUser: true, ControllerManagerUser: true}
	for _, u := range cfg.Users {
		if u.Name == "" {
			return errors.New("kubernetes control plane: a user without a name")
		}
		if seen[u.Name] {
			return fmt.Errorf("kubernetes control plane: user %q given twice (or a built-in user)", u.Name)
		}
		seen[u.Name] = true
	}
	return nil
}

// Prepare writes the PKI, the token file and the kubeconfigs under cfg.Dir
// (replacing any from an earlier Prepare) and returns the plan. It starts
// nothing.
func Prepare(cfg Config) (*Plan, error) {
	cfg, err := withDefaults(cfg)
	if err != nil {
		return nil, err
	}
	if err := validate(cfg); err != nil {
		return nil, err
	}
	if cfg.Bins == (Bins{}) {
		if cfg.Bins, err = FindBins(); err != nil {
			return nil, err
		}
	}
	pki := filepath.Join(cfg.Dir, "pki")
	for _, d := range []string{pki, filepath.Join(cfg.Dir, "users")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("prepare kubernetes control plane: %w", err)
		}
	}

	ca, err := certs.NewCA(pki, "ca", "loom kubernetes CA")
	if err != nil {
		return nil, fmt.Errorf("prepare kubernetes CA: %w", err)
	}
	lo := loopback()
	ips := []netip.Addr{cfg.Address}
	if cfg.Address != lo {
		ips = append(ips, lo)
	}
	// Pods reach the apiserver at the "kubernetes" Service's address.
	ips = append(ips, cfg.ServiceCIDR.Addr().Next())
	apiCert, err := ca.Server(pki, "apiserver", "kube-apiserver", ips...)
	if err != nil {
		return nil, fmt.Errorf("prepare apiserver certificate: %w", err)
	}
	cmCert, err := ca.Server(pki, "controller-manager", "kube-controller-manager", lo)
	if err != nil {
		return nil, fmt.Errorf("prepare controller manager certificate: %w", err)
	}
	saKey, saPub, err := writeServiceAccountKeys(pki)
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(ca.Cert)
	if err != nil {
		return nil, fmt.Errorf("read kubernetes CA: %w", err)
	}

	p := &Plan{
		Config:               cfg,
		URL:                  "https://" + net.JoinHostPort(cfg.Address.String(), strconv.Itoa(cfg.Port)),
		ControllerManagerURL: "https://" + net.JoinHostPort(lo.String(), strconv.Itoa(cfg.ControllerManagerPort)),
		CAFile:               ca.Cert,
		users:                map[string]userFiles{},
	}
	users := append([]User{
		{Name: AdminUser, Groups: []string{MastersGroup}},
		{Name: ControllerManagerUser, Groups: []string{MastersGroup}},
	}, cfg.Users...)
	files := map[string]string{}
	for _, u := range users {
		tok, err := newToken()
		if err != nil {
			return nil, err
		}
		path := userKubeconfigPath(cfg.Dir, u.Name)
		if other, ok := files[path]; ok {
			return nil, fmt.Errorf("kubernetes users %q and %q would share the kubeconfig %s: rename one", other, u.Name, path)
		}
		files[path] = u.Name
		if err := writeKubeconfig(path, p.URL, caPEM, u.Name, tok); err != nil {
			return nil, err
		}
		p.users[u.Name] = userFiles{token: tok, kubeconfig: path}
	}
	tokenFile := filepath.Join(pki, "tokens.csv")
	if err := writeTokenFile(tokenFile, users, p.users); err != nil {
		return nil, err
	}
	p.AdminKubeconfig = p.users[AdminUser].kubeconfig
	p.AdminToken = p.users[AdminUser].token
	p.ControllerManagerKubeconfig = p.users[ControllerManagerUser].kubeconfig

	p.APIServer = Command{Bin: cfg.Bins.APIServer, Args: apiServerArgs(cfg, apiCert, ca.Cert, saKey, saPub, tokenFile)}
	p.ControllerManager = Command{Bin: cfg.Bins.ControllerManager, Args: controllerManagerArgs(cfg, cmCert, ca.Cert, saKey, p.ControllerManagerKubeconfig)}
	if err := p.save(); err != nil {
		return nil, err
	}
	return p, nil
}

// planFile is where Prepare records the plan for Load.
const planFile = "plan.json"

// savedPlan is the JSON form of a Plan.
type savedPlan struct {
	Plan
	Users map[string]savedUser
}

type savedUser struct {
	Token, Kubeconfig string
}

func (p *Plan) save() error {
	s := savedPlan{Plan: *p, Users: map[string]savedUser{}}
	for name, u := range p.users {
		s.Users[name] = savedUser{Token: u.token, Kubeconfig: u.kubeconfig}
	}
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encode kubernetes control plane plan: %w", err)
	}
	return writeFile(filepath.Join(p.Config.Dir, planFile), append(data, '\n'))
}

// Load returns the plan an earlier Prepare wrote under dir, e.g. for a
// `loom lab` command run after `loom lab up`. Config.DialContext is nil:
// set it before calling Wait.
func Load(dir string) (*Plan, error) {
	path := filepath.Join(dir, planFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load kubernetes control plane plan: %w", err)
	}
	var s savedPlan
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("load kubernetes control plane plan %s: %w", path, err)
	}
	p := s.Plan
	p.users = map[string]userFiles{}
	for name, u := range s.Users {
		p.users[name] = userFiles{token: u.Token, kubeconfig: u.Kubeconfig}
	}
	return &p, nil
}

// apiServerArgs is kube-apiserver's command line. Each flag is here for a
// reason given beside it; everything else is the release's default.
func apiServerArgs(cfg Config, serving certs.Pair, caFile, saKey, saPub, tokenFile string) []string {
	args := []string{
		"--etcd-servers=" + strings.Join(cfg.EtcdServers, ","),
		"--bind-address=" + cfg.Address.String(),
		"--advertise-address=" + cfg.Address.String(),
		"--secure-port=" + strconv.Itoa(cfg.Port),
		"--tls-cert-file=" + serving.Cert,
		"--tls-private-key-file=" + serving.Key,
		// Clients holding a certificate from the cluster CA (none today, a
		// kubelet-like client later) are authenticated by it.
		"--client-ca-file=" + caFile,
		"--token-auth-file=" + tokenFile,
		// What kubeadm runs: the Node authorizer for kubelets, RBAC for
		// everyone else, so RBAC bindings are tested for real.
		"--authorization-mode=Node,RBAC",
		"--service-cluster-ip-range=" + cfg.ServiceCIDR.String(),
		"--service-account-issuer=" + serviceAccountIssuer,
		"--service-account-key-file=" + saPub,
		"--service-account-signing-key-file=" + saKey,
		// flannel's DaemonSet runs privileged; a lab applying it must not be
		// refused.
		"--allow-privileged=true",
		// Priority and fairness queues every request through a dozen
		// watched objects: load and memory a single-client cluster does
		// not need.
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--v=" + strconv.Itoa(cfg.Verbosity),
	}
	if cfg.Address.IsLoopback() {
		// The endpoint reconciler publishes the advertise address as the
		// "kubernetes" Service's endpoint, and endpoints refuse loopback
		// addresses: it would fail forever.
		args = append(args, "--endpoint-reconciler-type=none")
	}
	return args
}

// controllerManagerArgs is kube-controller-manager's command line.
func controllerManagerArgs(cfg Config, serving certs.Pair, caFile, saKey, kubeconfig string) []string {
	args := []string{
		"--kubeconfig=" + kubeconfig,
		// Its health port checks callers' tokens and permissions with the
		// apiserver, as its own user. Without skip-lookup it would also
		// read the front-proxy CA from kube-system, which this cluster does
		// not have, and log an error about it every few seconds.
		"--authentication-kubeconfig=" + kubeconfig,
		"--authorization-kubeconfig=" + kubeconfig,
		"--authentication-skip-lookup=true",
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(cfg.ControllerManagerPort),
		"--tls-cert-file=" + serving.Cert,
		"--tls-private-key-file=" + serving.Key,
		// One controller manager, nothing to elect; a restart must not wait
		// for the previous instance's lease to expire.
		"--leader-elect=false",
		"--use-service-account-credentials=false",
		// Every default controller but the node lifecycle controller: no
		// kubelet ever posts a Node's status here, so it would mark every
		// Node NotReady, taint it and evict its Pods after a few minutes.
		"--controllers=*,-node-lifecycle-controller",
		// Signs the tokens of service account token Secrets, and is
		// published as kube-root-ca.crt in every namespace.
		"--service-account-private-key-file=" + saKey,
		"--root-ca-file=" + caFile,
		"--service-cluster-ip-range=" + cfg.ServiceCIDR.String(),
		// There is no cloud provider to program routes into; loom programs
		// them.
		"--configure-cloud-routes=false",
		"--profiling=false",
		"--v=" + strconv.Itoa(cfg.Verbosity),
	}
	if cfg.ClusterCIDR.IsValid() {
		// The node IPAM controller gives each Node a podCIDR: what loom's
		// Kubernetes subnet manager (flannel's -kube-subnet-mgr) reads.
		args = append(args,
			"--allocate-node-cidrs=true",
			"--cluster-cidr="+cfg.ClusterCIDR.String(),
			"--node-cidr-mask-size="+strconv.Itoa(cfg.NodeCIDRMaskSize))
	} else {
		args = append(args, "--allocate-node-cidrs=false")
	}
	return args
}

// writeServiceAccountKeys makes the key pair that signs service account
// tokens: the apiserver signs and verifies with it, the controller manager
// signs legacy token Secrets.
func writeServiceAccountKeys(dir string) (keyPath, pubPath string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", fmt.Errorf("generate service account key: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", "", fmt.Errorf("encode service account key: %w", err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return "", "", fmt.Errorf("encode service account public key: %w", err)
	}
	keyPath, pubPath = filepath.Join(dir, "sa-key.pem"), filepath.Join(dir, "sa.pub")
	if err := writeFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})); err != nil {
		return "", "", err
	}
	if err := writeFile(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})); err != nil {
		return "", "", err
	}
	return keyPath, pubPath, nil
}

func newToken() (string, error) {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generate token: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// writeTokenFile writes kube-apiserver's --token-auth-file: CSV rows of
// token, user name, user ID, and the groups as one quoted field.
func writeTokenFile(path string, users []User, files map[string]userFiles) error {
	var b strings.Builder
	w := csv.NewWriter(&b)
	for _, u := range users {
		row := []string{files[u.Name].token, u.Name, u.Name}
		if len(u.Groups) > 0 {
			row = append(row, strings.Join(u.Groups, ","))
		}
		if err := w.Write(row); err != nil {
			return fmt.Errorf("write token of %s: %w", u.Name, err)
		}
	}
	w.Flush()
	if err := w.Error(); err != nil {
		return fmt.Errorf("write token file: %w", err)
	}
	return writeFile(path, []byte(b.String()))
}

func userKubeconfigPath(dir, user string) string {
	switch user {
	case AdminUser:
		return filepath.Join(dir, "admin.kubeconfig")
	case ControllerManagerUser:
		return filepath.Join(dir, "controller-manager.kubeconfig")
	}
	// User names hold colons (system:serviceaccount:ns:name) and may hold
	// slashes; a file name gets neither.
	safe := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' {
			return r
		}
		return '_'
	}, user)
	return filepath.Join(dir, "users", safe+".kubeconfig")
}

// writeKubeconfig writes a self-contained kubeconfig (the CA is embedded),
// so it can be copied anywhere, e.g. into a lab node's directory. JSON is
// valid kubeconfig: every client parses it as YAML.
func writeKubeconfig(path, server string, caPEM []byte, user, token string) error {
	type named struct {
		Name    string         `json:"name"`
		Cluster map[string]any `json:"cluster,omitempty"`
		User    map[string]any `json:"user,omitempty"`
		Context map[string]any `json:"context,omitempty"`
	}
	const name = "loom"
	cfg := map[string]any{
		"apiVersion":      "v1",
		"kind":            "Config",
		"clusters":        []named{{Name: name, Cluster: map[string]any{"server": server, "certificate-authority-data": base64.StdEncoding.EncodeToString(caPEM)}}},
		"users":           []named{{Name: user, User: map[string]any{"token": token}}},
		"contexts":        []named{{Name: name, Context: map[string]any{"cluster": name, "user": user}}},
		"current-context": name,
	}
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return fmt.Errorf("encode kubeconfig of %s: %w", user, err)
	}
	return writeFile(path, append(data, '\n'))
}

// writeFile writes a file readable only by its owner: keys, tokens and
// kubeconfigs are all secrets.
func writeFile(path string, data []byte) error {
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	// WriteFile keeps the mode of a file that already exists.
	if err := os.Chmod(path, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
