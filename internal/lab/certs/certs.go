// Package certs makes the TLS material of a test etcd cluster: a CA, one
// certificate per member (valid as server and as client, for the client
// and the peer listeners, with the member's addresses as IP SANs) and a
// client certificate for agents. Everything is generated in Go, so tests
// need no openssl or cfssl, and written as PEM files with private keys
// readable only by their owner.
package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"time"
)

// validity is how long generated certificates are valid: long enough for
// a lab left running, short enough that nothing outlives its purpose.
const validity = 30 * 24 * time.Hour

// Pair is a certificate and its key, as PEM file paths.
type Pair struct {
	Cert, Key string
}

// CA is a certificate authority that signs the other certificates.
type CA struct {
	Cert string // PEM file path: what clients and servers trust
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// NewCA creates a CA named name and writes its certificate to
// dir/<file>.pem (the key stays in memory: nothing else is ever signed).
func NewCA(dir, file, name string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	tmpl, err := template(name)
	if err != nil {
		return nil, err
	}
	tmpl.IsCA = true
	tmpl.BasicConstraintsValid = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("self-sign CA %s: %w", name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse CA %s: %w", name, err)
	}
	path := filepath.Join(dir, file+".pem")
	if err := writePEM(path, "CERTIFICATE", der, 0o644); err != nil {
		return nil, err
	}
	return &CA{Cert: path, cert: cert, key: key}, nil
}

// Server issues a certificate for a member reachable at ips, usable for
// both server and client authentication (etcd members dial each other with
// their own certificate), and writes dir/<file>.pem and dir/<file>-key.pem.
func (ca *CA) Server(dir, file, name string, ips ...netip.Addr) (Pair, error) {
	if len(ips) == 0 {
		return Pair{}, errors.New("server certificate without an IP address: clients verify the address they dial")
	}
	tmpl, err := template(name)
	if err != nil {
		return Pair{}, err
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, ip.AsSlice())
	}
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	return ca.issue(dir, file, tmpl)
}

// Client issues a client-only certificate with common name name.
func (ca *CA) Client(dir, file, name string) (Pair, error) {
	tmpl, err := template(name)
	if err != nil {
		return Pair{}, err
	}
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	return ca.issue(dir, file, tmpl)
}

func (ca *CA) issue(dir, file string, tmpl *x509.Certificate) (Pair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Pair{}, fmt.Errorf("generate key for %s: %w", tmpl.Subject.CommonName, err)
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return Pair{}, fmt.Errorf("sign certificate for %s: %w", tmpl.Subject.CommonName, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return Pair{}, fmt.Errorf("encode key of %s: %w", tmpl.Subject.CommonName, err)
	}
	p := Pair{Cert: filepath.Join(dir, file+".pem"), Key: filepath.Join(dir, file+"-key.pem")}
	if err := writePEM(p.Cert, "CERTIFICATE", der, 0o644); err != nil {
		return Pair{}, err
	}
	if err := writePEM(p.Key, "PRIVATE KEY", keyDER, 0o600); err != nil {
		return Pair{}, err
	}
	return p, nil
}

func template(name string) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("certificate serial: %w", err)
	}
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name, Organization: []string{"loom lab"}},
		NotBefore:    now.Add(-time.Hour), // tolerate a clock a little behind
		NotAfter:     now.Add(validity),
	}, nil
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	data := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, data, mode); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
