package certs

import (
	"crypto/tls"
	"crypto/x509"
	"net/netip"
	"os"
	"testing"
)

// Address plan: a member at 198.18.0.2 (the lab's underlay).

func TestIssuedCertificatesVerify(t *testing.T) {
	dir := t.TempDir()
	ca, err := NewCA(dir, "ca", "test CA")
	if err != nil {
		t.Fatal(err)
	}
	server, err := ca.Server(dir, "s1", "etcd s1", netip.MustParseAddr("198.18.0.2"))
	if err != nil {
		t.Fatal(err)
	}
	client, err := ca.Client(dir, "client", "agent")
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(ca.Cert)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatal("CA file holds no certificate")
	}
	for _, tc := range []struct {
		name  string
		pair  Pair
		host  string
		usage x509.ExtKeyUsage
	}{
		{"server, as server", server, "198.18.0.2", x509.ExtKeyUsageServerAuth},
		{"server, as peer client", server, "", x509.ExtKeyUsageClientAuth},
		{"client", client, "", x509.ExtKeyUsageClientAuth},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kp, err := tls.LoadX509KeyPair(tc.pair.Cert, tc.pair.Key)
			if err != nil {
				t.Fatal(err)
			}
			leaf, err := x509.ParseCertificate(kp.Certificate[0])
			if err != nil {
				t.Fatal(err)
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: tc.host, KeyUsages: []x509.ExtKeyUsage{tc.usage}}); err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(tc.pair.Key)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm() != 0o600 {
				t.Errorf("key %s has mode %v, want 0600", tc.pair.Key, st.Mode().Perm())
			}
		})
	}
	kp, _ := tls.LoadX509KeyPair(server.Cert, server.Key)
	leaf, _ := x509.ParseCertificate(kp.Certificate[0])
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: "198.18.0.3"}); err == nil {
		t.Error("the certificate of 198.18.0.2 verifies for 198.18.0.3")
	}
	if _, err := ca.Server(dir, "bad", "no address"); err == nil {
		t.Error("a server certificate without an address was issued")
	}
}
